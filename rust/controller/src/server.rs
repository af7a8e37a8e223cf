//! The controller's event loop: one native thread polling every socket.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fp_io::{
    recv_multipart, try_send, OutFrame, OutgoingMessage, ReadyFrames, RecvFrame, ReleaseQueue,
    Sent, SessionCore,
};
use fp_wire::{split_envelope, Envelope, Field, Parts, Value, DELIMITER};

use crate::config::ControllerConfig;
use crate::engines::{Engine, EngineTable, InFlight};
use crate::heart::{Heart, Probe, FAST_PING, PROBE_GRACE, PROBE_PING};
use crate::log::{log_at, Level};
use crate::messages::{error_metadata, hub_error_content, reply_type, str_field};
use crate::scheduler::Balancer;

pub const REG: usize = 0;
pub const NOTIF: usize = 1;
pub const MUX_C: usize = 2;
pub const MUX_E: usize = 3;
pub const CTL_C: usize = 4;
pub const CTL_E: usize = 5;
pub const TASK_C: usize = 6;
pub const TASK_E: usize = 7;
pub const IOP_C: usize = 8;
pub const IOP_E: usize = 9;
pub const HB_PING: usize = 10;
pub const HB_PONG: usize = 11;
pub const BCAST_C: usize = 12;
pub const BCAST_E: usize = 13;
/// Not a channel: the monitor of [`HB_PONG`]'s connections (see `heart::Probe`).
pub const HB_MON: usize = 14;

/// Counters shared with the owner of the controller.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub engines: AtomicU64,
    pub tasks_queued: AtomicU64,
    pub tasks_assigned: AtomicU64,
    pub engine_errors: AtomicU64,
}

pub(crate) type Env = Envelope<RecvFrame>;

/// A set of sockets by index (bit `i`: socket `i`), as [`Server::poll`] finds them: no
/// allocation per pass of the loop (there are at most [`MAX_SOCKETS`]).
type Ready = u64;
const MAX_SOCKETS: usize = Ready::BITS as usize;

pub(crate) const BURST: usize = 256;
/// Sockets towards clients: what the loop sends on them during a pass leaves together at the
/// end of the pass, output before replies (see [`Server::send`]).
const DEFERRED: [usize; 5] = [IOP_C, MUX_C, CTL_C, TASK_C, BCAST_C];
/// Protocol extensions listed in `connection_reply.fp_features`: `fanout-uuids`, the MUX
/// fan-out naming its engines by uuid (see [`FANOUT`] and `fan_out`; earlier controllers
/// announced `fanout` and read `[uuid, msg_id]` pairs only), and `abort`, `abort_request` on
/// the hub.
const FEATURES: [&str; 2] = ["fanout-uuids", "abort"];
/// The routing identity a client uses for a request that the controller fans out.
pub const FANOUT: &[u8] = b"fp:fanout";
/// The "client" of the scheduler's own `abort_request`s (work stealing, `tasks.rs`): engines
/// answer it on the control channel, and those answers go nowhere.
pub const STEAL_IDENT: &[u8] = b"fp:scheduler";
/// Time given to flush the shutdown notification before the loop exits.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

pub struct Server {
    pub(crate) cfg: ControllerConfig,
    socks: Vec<zmq::Socket>,
    pending: Vec<VecDeque<ReadyFrames>>,
    pub(crate) session: SessionCore,
    pub(crate) releases: ReleaseQueue,
    /// Engine links (see `links`).
    pub(crate) links: crate::links::Links,
    pub(crate) engines: EngineTable,
    pub(crate) heart: Heart,
    pub(crate) balancer: Balancer,
    pub(crate) tasks: crate::tasks::TaskState,
    pub(crate) records: crate::records::Records,
    pub(crate) broadcast: crate::broadcast::BroadcastState,
    stop: Arc<AtomicBool>,
    pub(crate) stats: Arc<Stats>,
    /// Engines (by id) in the shared table, for the Python side.
    pub shared_engines: Arc<std::sync::Mutex<Vec<(i64, String)>>>,
    /// The engine connection settings sent in every `registration_reply` (set by the
    /// controller's application once it has written the engine connection file).
    pub engine_info: Arc<std::sync::Mutex<Value>>,
    shutdown_at: Option<Instant>,
    /// Sockets whose `ZMQ_EVENTS` must be read before the next blocking poll: those we
    /// operated on (an operation can consume the edge-triggered `ZMQ_FD` signal) and those
    /// whose descriptor fired.
    check: Vec<bool>,
}

pub(crate) fn frames_of(idents: Vec<OutFrame>, env: Env) -> Vec<OutFrame> {
    let mut out = idents;
    out.reserve(6 + env.buffers.len());
    out.push(OutFrame::Owned(DELIMITER.to_vec()));
    out.push(OutFrame::Received(env.signature));
    out.push(OutFrame::Received(env.header));
    out.push(OutFrame::Received(env.parent_header));
    out.push(OutFrame::Received(env.metadata));
    out.push(OutFrame::Received(env.content));
    out.extend(env.buffers.into_iter().map(OutFrame::Received));
    out
}

/// The packed bytes of one of the four dict parts of `env`, by name.
fn part_of<'a>(env: &'a Env, part: &str) -> &'a [u8] {
    match part {
        "header" => env.header.as_ref(),
        "parent_header" => env.parent_header.as_ref(),
        "metadata" => env.metadata.as_ref(),
        _ => env.content.as_ref(),
    }
}

pub(crate) fn ident(bytes: &[u8]) -> OutFrame {
    OutFrame::Owned(bytes.to_vec())
}

/// The longest routing identity ZMQ allows (a uuid engines route by must fit).
const MAX_IDENTITY: usize = 255;

pub(crate) fn show(id: &[u8]) -> String {
    String::from_utf8(id.to_vec()).unwrap_or_else(|_| format!("{id:02x?}"))
}

impl Server {
    pub fn new(
        cfg: ControllerConfig,
        socks: Vec<zmq::Socket>,
        stop: Arc<AtomicBool>,
        stats: Arc<Stats>,
    ) -> Result<Server, String> {
        let session = SessionCore::new(
            cfg.key.clone(),
            cfg.packer,
            &cfg.signature_scheme,
            fp_wire::new_id(),
            "controller".into(),
            fp_wire::DEFAULT_HISTORY_SIZE,
            fp_wire::Limits::default(),
        )
        .map_err(|e| e.to_string())?
        .with_sign_buffers(fp_io::sign_buffers_default());
        let mut engines = EngineTable::default();
        if cfg.restore {
            if let Some(path) = &cfg.engine_state_file {
                match engines.restore_state(path) {
                    Ok(n) => log_at!(
                        Level::Info,
                        "restored engine state: {n} engine ids reserved"
                    ),
                    Err(e) => log_at!(Level::Warning, "cannot restore engine state: {e}"),
                }
            }
        }
        let heart = Heart::new(
            Duration::from_millis(cfg.hb_period_ms.max(1)),
            cfg.hb_max_misses,
        );
        let budget = Duration::from_secs_f64(cfg.hwm_budget_ms.max(0.0) / 1000.0);
        let balancer = Balancer::new(cfg.scheme, cfg.hwm, budget);
        let records = crate::records::Records::open(
            &crate::records::RecordsConfig {
                db: cfg.db.clone(),
                path: cfg.db_path.clone(),
                restore: cfg.restore,
                record_limit: cfg.db_record_limit,
                size_limit: cfg.db_size_limit,
            },
            cfg.packer,
        )?
        .with_store_checks(
            SessionCore::new(
                cfg.key.clone(),
                cfg.packer,
                &cfg.signature_scheme,
                fp_wire::new_id(),
                "controller".into(),
                1,
                fp_wire::Limits::default(),
            )
            .map_err(|e| e.to_string())?,
        );
        let n = socks.len();
        if n > MAX_SOCKETS {
            return Err(format!(
                "{n} sockets: the controller polls at most {MAX_SOCKETS}"
            ));
        }
        Ok(Server {
            cfg,
            socks,
            pending: (0..n).map(|_| VecDeque::new()).collect(),
            session,
            releases: ReleaseQueue::new(),
            links: crate::links::Links::default(),
            engines,
            heart,
            balancer,
            tasks: crate::tasks::TaskState::default(),
            records,
            broadcast: Default::default(),
            stop,
            stats,
            shared_engines: Arc::default(),
            engine_info: Arc::new(std::sync::Mutex::new(Value::empty_map())),
            shutdown_at: None,
            check: vec![true; n],
        })
    }

    /// Serve engine links on `listener` (see `links`).
    pub(crate) fn set_link_listener(&mut self, listener: std::os::unix::net::UnixListener) {
        self.links = crate::links::Links::new(Some(listener));
    }

    /// Take the sockets back (for the fuzzing harness, which reuses them); the server cannot
    /// send or receive afterwards.
    pub(crate) fn take_sockets(&mut self) -> Vec<zmq::Socket> {
        for q in &mut self.pending {
            q.clear();
        }
        std::mem::take(&mut self.socks)
    }

    pub fn run(&mut self) {
        log_at!(
            Level::Info,
            "controller running (scheme {})",
            self.cfg.scheme.name()
        );
        loop {
            if self.stop.load(Ordering::SeqCst) && self.shutdown_at.is_none() {
                self.begin_shutdown(Value::empty_map());
            }
            if let Some(t) = self.shutdown_at {
                if Instant::now() >= t {
                    break;
                }
            }
            let timeout = self.poll_timeout();
            let (readable, writable) = self.poll(timeout);
            let has = |set: Ready, i: usize| set & (1 << i) != 0;
            // links first: a peer's requests come over its link, what it sends about them
            // (aborts, queries) over ZMQ sockets, and usually in that order
            self.service_links();
            for i in 0..self.socks.len() {
                if has(writable, i) {
                    self.flush(i);
                }
                if has(readable, i) {
                    self.receive(i);
                }
            }
            self.timers();
            for i in DEFERRED {
                if !self.pending[i].is_empty() {
                    self.flush(i);
                }
            }
            self.flush_links();
        }
        for i in 0..self.socks.len() {
            self.flush(i);
        }
        drop(self.releases.drain());
        log_at!(Level::Info, "controller stopped");
    }

    fn poll_timeout(&self) -> i64 {
        let now = Instant::now();
        let mut next = self.heart.next_beat;
        if let Some(f) = self.heart.next_fast_ping {
            next = next.min(f);
        }
        if let Some(p) = self.heart.probe {
            next = next.min(p.next_ping).min(p.deadline);
        }
        if let Some(s) = self.shutdown_at {
            next = next.min(s);
        }
        let wait = next.saturating_duration_since(now).as_millis() as i64;
        wait.clamp(0, 100)
    }

    /// Which sockets can be read (`POLLIN` wanted) or written (messages queued), waiting up
    /// to `timeout_ms` when none can.
    ///
    /// `zmq_poll` reads every socket's command mailbox on each call (one `poll(2)` per
    /// socket, twice per wake-up), which on a dozen sockets is most of the syscalls the
    /// controller makes per message. Here `poll(2)` watches each socket's `ZMQ_FD`, and
    /// `ZMQ_EVENTS` is read only for sockets that were touched or whose descriptor fired.
    fn poll(&mut self, timeout_ms: i64) -> (Ready, Ready) {
        let n = self.socks.len();
        let (mut readable, mut writable) = (0, 0);
        self.check.resize(n, true);
        let early = self.ready_now(&mut readable, &mut writable);
        if early && self.links.is_empty() {
            return (readable, writable);
        }
        // the sockets' descriptors only when nothing is ready on them (then a wait), the
        // links' always (without waiting when a socket or a link is ready already)
        let mut fds: Vec<libc::pollfd> = Vec::new();
        if !early {
            fds.extend(self.socks.iter().map(|s| libc::pollfd {
                fd: s.get_fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            }));
        }
        let k = fds.len();
        fds.extend(self.links.pollfds());
        let ms = if early || self.links.has_more() {
            0
        } else {
            timeout_ms.clamp(0, i32::MAX as i64) as i32
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        self.links.set_revents(&fds[k..]);
        if early {
            return (readable, writable);
        }
        for (c, fd) in self.check.iter_mut().zip(&fds[..k]) {
            // timeout, EINTR or an error: look at every socket (cheap, at most every 100 ms)
            *c |= rc <= 0 || fd.revents != 0;
        }
        self.ready_now(&mut readable, &mut writable);
        (readable, writable)
    }

    /// Read `ZMQ_EVENTS` of the sockets marked in `check`; true if any can be served now.
    fn ready_now(&mut self, readable: &mut Ready, writable: &mut Ready) -> bool {
        let mut any = false;
        for i in 0..self.socks.len() {
            if !std::mem::take(&mut self.check[i]) {
                continue;
            }
            let ev = self.socks[i]
                .get_events()
                .unwrap_or(zmq::POLLIN | zmq::POLLOUT);
            if !matches!(i, NOTIF | IOP_C | HB_PING) && ev.contains(zmq::POLLIN) {
                *readable |= 1 << i;
                any = true;
            }
            if !self.pending[i].is_empty() && ev.contains(zmq::POLLOUT) {
                *writable |= 1 << i;
                any = true;
            }
        }
        any
    }

    // ----- sending ------------------------------------------------------------------------

    /// Send frames on socket `i`; returns the errno when the send failed outright.
    ///
    /// On the sockets towards clients ([`DEFERRED`]) the frames are queued and sent at the
    /// end of the loop's pass, with everything else the pass sends there: libzmq wakes its
    /// I/O thread for the first message of a burst only, not for each message, which was
    /// 11% of the controller's CPU under a stream of tasks. Failures there are not reported
    /// (a client that left is not an error); sends to engines stay immediate, their
    /// failures reroute or fail the task.
    pub(crate) fn send(&mut self, i: usize, frames: Vec<OutFrame>) -> Result<(), i32> {
        let Some(frames) = self.send_over_link(i, frames) else {
            return Ok(());
        };
        let ready = ReadyFrames::new(frames, &self.releases);
        if let Some(c) = self.check.get_mut(i) {
            *c = true; // the send may consume this socket's ZMQ_FD signal
        }
        if !self.pending[i].is_empty() || DEFERRED.contains(&i) {
            self.pending[i].push_back(ready);
            return Ok(());
        }
        match try_send(&mut self.socks[i], ready) {
            Sent::Ok => Ok(()),
            Sent::WouldBlock(r) => {
                self.pending[i].push_back(r);
                Ok(())
            }
            Sent::Failed(errno, text) => {
                log_at!(Level::Debug, "send on socket {i} failed: {text}");
                Err(errno)
            }
        }
    }

    fn flush(&mut self, i: usize) {
        if let Some(c) = self.check.get_mut(i) {
            *c = true;
        }
        while let Some(ready) = self.pending[i].pop_front() {
            match try_send(&mut self.socks[i], ready) {
                Sent::Ok => {}
                Sent::WouldBlock(r) => {
                    self.pending[i].push_front(r);
                    return;
                }
                // a client that left (a socket towards clients) is routine
                Sent::Failed(_, text) if DEFERRED.contains(&i) => {
                    log_at!(Level::Debug, "send on socket {i} failed: {text}")
                }
                Sent::Failed(_, text) => log_at!(Level::Warning, "dropped queued message: {text}"),
            }
        }
    }

    /// Build, sign and send a message generated by the controller.
    pub(crate) fn send_new(
        &mut self,
        i: usize,
        idents: Vec<Vec<u8>>,
        msg_type: &str,
        content: Value,
        parent: Value,
        metadata: Value,
    ) {
        let parts = Parts {
            header: self.session.headers.header(msg_type),
            parent_header: parent,
            metadata,
            content,
        };
        self.send_parts(i, idents, msg_type, parts);
    }

    /// Sign and send `parts` (no buffers) to `idents` on socket `i`.
    fn send_parts(&mut self, i: usize, idents: Vec<Vec<u8>>, msg_type: &str, parts: Parts) {
        match self.session.build_frames(OutgoingMessage {
            idents,
            parts,
            buffers: Vec::new(),
        }) {
            Ok(frames) => {
                let _ = self.send(i, frames);
            }
            Err(e) => log_at!(Level::Error, "cannot build {msg_type}: {e}"),
        }
    }

    /// Answer `msg_id` with a reply the controller makes up (no engine sent it): recorded by
    /// the hub under the very header it is sent with, and sent on `sock` (when given) to
    /// `idents`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn answer_made_up(
        &mut self,
        sock: Option<usize>,
        idents: Vec<Vec<u8>>,
        msg_id: &str,
        engine: Option<&[u8]>,
        msg_type: &str,
        content: Value,
        parent: Value,
        metadata: Value,
    ) {
        let header = self.session.headers.header(msg_type);
        self.records
            .on_controller_reply(msg_id, engine, &header, &metadata, &content);
        let Some(sock) = sock else {
            return;
        };
        let parts = Parts {
            header,
            parent_header: parent,
            metadata,
            content,
        };
        self.send_parts(sock, idents, msg_type, parts);
    }

    fn notify(&mut self, msg_type: &str, content: Value) {
        self.send_new(
            NOTIF,
            Vec::new(),
            msg_type,
            content,
            Value::empty_map(),
            Value::empty_map(),
        );
    }

    // ----- receiving ----------------------------------------------------------------------

    fn receive(&mut self, i: usize) {
        if let Some(c) = self.check.get_mut(i) {
            *c = true; // messages may be left (burst limit); ZMQ_EVENTS tells
        }
        for _ in 0..BURST {
            let frames = match recv_multipart(&mut self.socks[i]) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    log_at!(Level::Warning, "receive error on socket {i}: {e}");
                    return;
                }
            };
            self.handle(i, frames);
        }
    }

    /// Handle one message received on socket `i`.
    pub(crate) fn handle(&mut self, i: usize, frames: Vec<RecvFrame>) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if i == HB_PONG {
            self.on_pong(frames);
            return;
        }
        if i == HB_MON {
            self.on_heartbeat_disconnect(&frames);
            return;
        }
        let Some(env) = self.verified(i, frames) else {
            return;
        };
        match i {
            REG => self.on_query(env),
            MUX_C => self.on_client_relay(env, MUX_C, MUX_E, true),
            CTL_C => self.on_client_relay(env, CTL_C, CTL_E, false),
            MUX_E => self.on_engine_reply(env, MUX_C, true),
            CTL_E => self.on_engine_reply(env, CTL_C, false),
            TASK_C => self.on_task_submit(env),
            TASK_E => self.on_task_reply(env),
            IOP_E => self.on_iopub(env),
            BCAST_C => self.on_broadcast_submit(env),
            BCAST_E => self.on_broadcast_reply(env),
            _ => {}
        }
    }

    /// Split and verify the signature; malformed or forged messages are logged and dropped.
    ///
    /// Buffers are not checked against their digest here: the controller forwards them
    /// unread, with the sender's signed digest, so the receiving engine or client checks them;
    /// the hub checks stored buffers before it serves them under a digest of its own (see
    /// `records::hub`). A large array is then hashed twice on its way, not three times.
    fn verified(&mut self, i: usize, frames: Vec<RecvFrame>) -> Option<Env> {
        let result = split_envelope(frames, &self.session.limits)
            .and_then(|env| self.session.verify_signature(&env, true).map(|_| env));
        match result {
            Ok(env) => Some(env),
            Err(e) => {
                if let Some(n) = self.count_drop() {
                    let ch = crate::config::CHANNELS[i];
                    log_at!(
                        Level::Warning,
                        "dropped message on {ch}: {e} ({n} dropped so far)"
                    );
                }
                None
            }
        }
    }

    /// Count a dropped message; `Some(total)` when it should be logged: a flood of junk must
    /// not become a flood of log lines (the first 20, then one in 1,000).
    pub(crate) fn count_drop(&self) -> Option<u64> {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= 20 || n % 1000 == 0).then_some(n)
    }

    pub(crate) fn unpack(&mut self, env: &Env, part: &'static str) -> Option<Value> {
        match self.session.packer.unpack(part_of(env, part), part) {
            Ok(v) => Some(v),
            Err(e) => {
                self.log_drop(&e);
                None
            }
        }
    }

    /// Check that one part of `env` unpacks, without building it (see `unpack` for drops).
    pub(crate) fn check_part(&mut self, env: &Env, part: &'static str) -> bool {
        match self.session.packer.validate(part_of(env, part), part) {
            Ok(()) => true,
            Err(e) => {
                self.log_drop(&e);
                false
            }
        }
    }

    /// The fields `keys` of one part of `env`, read in place (see `Packer::fields`): no
    /// allocation per field as unpacking the whole part would cost. None (counted as a drop,
    /// like `unpack`) when the part does not unpack.
    pub(crate) fn fields<'a, const N: usize>(
        &mut self,
        env: &'a Env,
        part: &'static str,
        keys: [&str; N],
    ) -> Option<[Option<Field<'a>>; N]> {
        match self.session.packer.fields(part_of(env, part), part, keys) {
            Ok(found) => Some(found),
            Err(e) => {
                self.log_drop(&e);
                None
            }
        }
    }

    fn log_drop(&self, e: &dyn std::fmt::Display) {
        if let Some(n) = self.count_drop() {
            log_at!(Level::Warning, "dropped message: {e} ({n} dropped so far)");
        }
    }

    /// Whether `msg_type` names a request (`*_request`), which engines answer; anything else
    /// is dropped and logged: an engine ignores it, so it would stay pending in the hub and,
    /// as a task, hold its engine's slot for ever.
    pub(crate) fn is_request(&mut self, msg_type: &str, channel: &str) -> bool {
        if msg_type.ends_with("_request") {
            return true;
        }
        if let Some(n) = self.count_drop() {
            let shown: String = msg_type.chars().take(64).collect();
            log_at!(
                Level::Warning,
                "dropped a {channel} message of type {shown:?}: only *_request messages are \
                 relayed ({n} dropped so far)"
            );
        }
        false
    }

    pub(crate) fn header_of(&mut self, env: &Env) -> Option<(Value, String, String)> {
        let header = self.unpack(env, "header")?;
        let msg_id = str_field(&header, "msg_id").map(str::to_owned);
        let msg_type = str_field(&header, "msg_type").map(str::to_owned);
        match (msg_id, msg_type) {
            (Some(id), Some(ty)) => Some((header, id, ty)),
            _ => {
                self.header_lacks_ids();
                None
            }
        }
    }

    /// Count and log a dropped message whose header has no msg_id or msg_type string.
    pub(crate) fn header_lacks_ids(&self) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        log_at!(
            Level::Warning,
            "dropped message whose header lacks msg_id/msg_type"
        );
    }

    // ----- hub queries and registration -----------------------------------------------------

    fn on_query(&mut self, env: Env) {
        let Some(zid) = env.idents.first().map(|f| f.as_ref().to_vec()) else {
            log_at!(Level::Warning, "dropped query without a routing identity");
            return;
        };
        let Some((header, _, msg_type)) = self.header_of(&env) else {
            return;
        };
        if self.unpack(&env, "parent_header").is_none() || self.unpack(&env, "metadata").is_none() {
            return;
        }
        let Some(content) = self.unpack(&env, "content") else {
            return;
        };
        match msg_type.as_str() {
            "registration_request" => self.on_registration(zid, header, content),
            "unregistration_request" => {
                if let Some(id) = content.get("id").and_then(Value::as_i64) {
                    if let Some(uuid) = self.engines.uuid_of(id).cloned() {
                        self.unregister(&uuid, "it asked to unregister");
                    }
                }
            }
            "connection_request" => {
                let content = Value::map([
                    ("status", Value::from("ok")),
                    ("engines", self.engines.registered_map()),
                    // our extensions, for clients that would otherwise assume an ipyparallel hub
                    (
                        "fp_features",
                        Value::Array(FEATURES.iter().map(|f| Value::from(*f)).collect()),
                    ),
                ]);
                self.send_new(
                    REG,
                    vec![zid],
                    "connection_reply",
                    content,
                    header,
                    Value::empty_map(),
                );
            }
            "queue_request" => self.on_queue_request(zid, header, content),
            "load_request" => self.on_load_request(zid, header, content),
            "db_request" | "history_request" | "result_request" | "purge_request"
            | "resubmit_request" => {
                self.on_records_query(zid, header, &msg_type, content);
            }
            "abort_request" => {
                let ids: foldhash::HashSet<String> = content
                    .get("msg_ids")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                for id in &ids {
                    self.tasks.stealing.remove(id); // (the user's abort wins over a steal)
                }
                let aborted = self.abort_queued(&ids);
                let reply = Value::map([
                    ("status", Value::from("ok")),
                    (
                        "aborted",
                        Value::Array(aborted.into_iter().map(Value::Str).collect()),
                    ),
                ]);
                self.send_new(
                    REG,
                    vec![zid],
                    "abort_reply",
                    reply,
                    header,
                    Value::empty_map(),
                );
            }
            "shutdown_request" => {
                log_at!(Level::Info, "shutdown requested by a client");
                let ok = Value::map([("status", Value::from("ok"))]);
                self.send_new(
                    REG,
                    vec![zid],
                    "shutdown_reply",
                    ok,
                    header.clone(),
                    Value::empty_map(),
                );
                self.begin_shutdown(header);
            }
            "become_dask_request" => {
                // ipyparallel's hub runs a dask scheduler in its own (Python) process; this
                // one has no Python to run it in
                let evalue = "the ferroparallel controller does not run a dask scheduler: \
                    connect with ferroparallel.Client, whose become_dask() runs the scheduler \
                    in the client process and makes the engines its workers";
                log_at!(
                    Level::Info,
                    "become_dask_request refused: no dask scheduler here"
                );
                self.query_error(
                    zid,
                    "become_dask_reply",
                    header,
                    "NotImplementedError",
                    evalue,
                );
            }
            "stop_distributed_request" => {
                // as ipyparallel's hub when no scheduler runs: nothing to stop
                let ok = Value::map([("status", Value::from("ok"))]);
                self.send_new(
                    REG,
                    vec![zid],
                    "stop_distributed_reply",
                    ok,
                    header,
                    Value::empty_map(),
                );
            }
            other => {
                // KeyError with this text, as ipyparallel's hub
                let evalue = format!("Bad Message Type: '{other}'");
                log_at!(Level::Warning, "unsupported hub request: {evalue}");
                self.query_error(zid, "hub_error", header, "KeyError", &evalue);
            }
        }
    }

    /// Answer a hub query with an error content (`msg_type` is usually `hub_error`).
    fn query_error(&mut self, zid: Vec<u8>, msg_type: &str, parent: Value, ename: &str, why: &str) {
        let content = hub_error_content(ename, why);
        self.send_new(
            REG,
            vec![zid],
            msg_type,
            content,
            parent,
            Value::empty_map(),
        );
    }

    fn on_registration(&mut self, zid: Vec<u8>, header: Value, content: Value) {
        let Some(uuid) = str_field(&content, "uuid").map(|s| s.as_bytes().to_vec()) else {
            let why = "registration_request needs a 'uuid'";
            self.query_error(zid, "registration_reply", header, "KeyError", why);
            return;
        };
        if uuid.is_empty() || uuid.len() > MAX_IDENTITY {
            // the engine's sockets are routed by this uuid, and a ZMQ identity has 1..=255 bytes
            let evalue = format!(
                "engine uuid of {} bytes cannot be a ZMQ routing identity (1 to {MAX_IDENTITY} bytes)",
                uuid.len()
            );
            log_at!(Level::Warning, "refused registration: {evalue}");
            self.query_error(zid, "registration_reply", header, "ValueError", &evalue);
            return;
        }
        if self.engines.by_uuid.contains_key(&uuid) {
            let evalue = format!(
                "engine uuid {} is already registered or pending",
                show(&uuid)
            );
            log_at!(Level::Warning, "refused registration: {evalue}");
            self.query_error(zid, "registration_reply", header, "KeyError", &evalue);
            return;
        }
        let requested = content.get("id").and_then(Value::as_i64);
        let id = self.engines.assign_id(requested);
        let stall = Duration::from_millis(self.cfg.registration_timeout_ms);
        self.engines.insert(Engine {
            id,
            uuid: uuid.clone(),
            registered: false,
            last_beat: self.heart.beat,
            stall_deadline: Instant::now() + stall,
            mux: Default::default(),
            bcast: Default::default(),
            tasks: Default::default(),
            completed: Vec::new(),
        });
        log_at!(
            Level::Info,
            "registration request from engine {id} ({})",
            show(&uuid)
        );
        let reply = Value::map([
            ("status", Value::from("ok")),
            ("id", Value::Int(id)),
            ("hb_period", Value::Int(self.cfg.hb_period_ms as i64)),
            (
                "connection_info",
                self.engine_info
                    .lock()
                    .map(|v| v.clone())
                    .unwrap_or_else(|_| Value::empty_map()),
            ),
        ]);
        self.send_new(
            REG,
            vec![zid],
            "registration_reply",
            reply,
            header,
            Value::empty_map(),
        );
        if self.heart.next_fast_ping.is_none() {
            self.heart.next_fast_ping = Some(Instant::now());
        }
    }

    /// The engines a hub query names in `targets` (all when absent), or the error to answer.
    fn query_targets(&self, content: &Value) -> Result<Vec<Vec<u8>>, (&'static str, String)> {
        let mut targets: Vec<Vec<u8>> = Vec::new();
        match content.get("targets") {
            None | Some(Value::Nil) => {
                targets = self.engines.ids.values().cloned().collect();
            }
            Some(Value::Array(items)) => {
                for t in items {
                    let uuid = match t {
                        Value::Str(s) => Some(s.as_bytes().to_vec())
                            .filter(|u| self.engines.by_uuid.contains_key(u)),
                        other => other
                            .as_i64()
                            .and_then(|id| self.engines.uuid_of(id).cloned()),
                    };
                    match uuid {
                        Some(u) => targets.push(u),
                        None => {
                            let why =
                                format!("no such engine: {}", crate::records::query::describe(t));
                            return Err(("IndexError", why));
                        }
                    }
                }
            }
            Some(other) => {
                let why = format!(
                    "targets must be a list of engine ids or uuids, not {}",
                    crate::records::query::describe(other)
                );
                return Err(("TypeError", why));
            }
        }
        Ok(targets)
    }

    /// `load_request`: the requests each engine holds (direct and load-balanced), by id.
    fn on_load_request(&mut self, zid: Vec<u8>, header: Value, content: Value) {
        let targets = match self.query_targets(&content) {
            Ok(t) => t,
            Err((ename, why)) => {
                self.query_error(zid, "hub_error", header, ename, &why);
                return;
            }
        };
        let mut reply = Value::map([("status", Value::from("ok"))]);
        for uuid in &targets {
            if let Some(e) = self.engines.by_uuid.get(uuid) {
                let load = (e.mux.len() + e.tasks.len()) as i64;
                reply.set(&e.id.to_string(), Value::Int(load));
            }
        }
        self.send_new(
            REG,
            vec![zid],
            "load_reply",
            reply,
            header,
            Value::empty_map(),
        );
    }

    fn on_queue_request(&mut self, zid: Vec<u8>, header: Value, content: Value) {
        let verbose = matches!(content.get("verbose"), Some(Value::Bool(true)));
        let targets = match self.query_targets(&content) {
            Ok(t) => t,
            Err((ename, why)) => {
                self.query_error(zid, "hub_error", header, ename, &why);
                return;
            }
        };
        let mut reply = Value::map([("status", Value::from("ok"))]);
        let ids = |len: usize, keys: &mut dyn Iterator<Item = &String>| -> Value {
            if verbose {
                Value::Array(keys.map(|k| Value::Str(k.clone())).collect())
            } else {
                Value::Int(len as i64)
            }
        };
        for uuid in &targets {
            if let Some(e) = self.engines.by_uuid.get(uuid) {
                let entry = Value::map([
                    ("queue", ids(e.mux.len(), &mut e.mux.keys())),
                    (
                        "completed",
                        if verbose {
                            Value::Array(
                                e.completed.iter().map(|k| Value::Str(k.clone())).collect(),
                            )
                        } else {
                            Value::Int(e.completed.len() as i64)
                        },
                    ),
                    ("tasks", ids(e.tasks.len(), &mut e.tasks.iter())),
                ]);
                reply.set(&e.id.to_string(), entry);
            }
        }
        let unassigned = if verbose {
            Value::Array(
                self.tasks
                    .queue
                    .iter()
                    .map(|t| Value::Str(t.msg_id.clone()))
                    .collect(),
            )
        } else {
            Value::Int(self.tasks.unassigned() as i64)
        };
        reply.set("unassigned", unassigned);
        self.send_new(
            REG,
            vec![zid],
            "queue_reply",
            reply,
            header,
            Value::empty_map(),
        );
    }

    fn register(&mut self, uuid: &[u8]) {
        let Some(e) = self.engines.by_uuid.get_mut(uuid) else {
            return;
        };
        if e.registered {
            return;
        }
        e.registered = true;
        e.last_beat = self.heart.beat;
        let (id, uuid_s) = (e.id, e.uuid_str());
        self.balancer.add(uuid.to_vec());
        log_at!(Level::Info, "engine {id} registered ({uuid_s})");
        self.notify(
            "registration_notification",
            Value::map([("id", Value::Int(id)), ("uuid", Value::Str(uuid_s))]),
        );
        self.engines_changed();
        self.drain_queue();
    }

    pub(crate) fn unregister(&mut self, uuid: &[u8], why: &str) {
        self.links.close_ident(uuid);
        let Some(engine) = self.engines.remove(uuid) else {
            return;
        };
        self.balancer.remove(uuid);
        let uuid_s = engine.uuid_str();
        if engine.registered {
            log_at!(Level::Info, "engine {} unregistered: {why}", engine.id);
            self.notify(
                "unregistration_notification",
                Value::map([
                    ("id", Value::Int(engine.id)),
                    ("uuid", Value::Str(uuid_s.clone())),
                ]),
            );
        } else {
            log_at!(
                Level::Info,
                "pending registration of engine {} dropped: {why}",
                engine.id
            );
        }
        for (msg_id, req) in engine.mux {
            // recorded, not sent: as ipyparallel's hub, which leaves the requests stranded on
            // a dead engine to the clients (they fail them on the unregistration notice; a
            // reply now would reach an ipyparallel client as a stale result it prints)
            self.fail_request(None, &engine.uuid, engine.id, &msg_id, req);
        }
        for (msg_id, req) in engine.bcast {
            let evalue = format!("Engine {} died while running task {msg_id:?}", engine.id);
            let content = hub_error_content("EngineError", &evalue);
            self.fail_broadcast(&engine.uuid, req, content);
        }
        self.tasks_stranded(&engine.uuid, engine.id);
        self.engines_changed();
    }

    /// Answer a request stranded on a dead engine with an EngineError reply.
    /// Record (and with `sock`, answer on that socket) the failure of a request stranded on
    /// a dead engine.
    pub(crate) fn fail_request(
        &mut self,
        sock: Option<usize>,
        uuid: &[u8],
        id: i64,
        msg_id: &str,
        req: InFlight,
    ) {
        self.stats.engine_errors.fetch_add(1, Ordering::Relaxed);
        let uuid_s = show(uuid);
        let evalue = format!("Engine {id} died while running task {msg_id:?}");
        // as ipyparallel's scheduler and client: a wrapped exception (`engine_info` empty:
        // stock clients then expect no more output for it) naming the engine in its text
        // and in the metadata
        let content = hub_error_content("EngineError", &evalue);
        self.answer_made_up(
            sock,
            vec![req.client, uuid.to_vec()],
            msg_id,
            Some(uuid),
            &reply_type(&req.msg_type),
            content,
            req.header,
            error_metadata(Some(&uuid_s)),
        );
    }

    pub(crate) fn engines_changed(&mut self) {
        self.stats
            .engines
            .store(self.engines.registered_count() as u64, Ordering::Relaxed);
        if let Ok(mut shared) = self.shared_engines.lock() {
            *shared = self
                .engines
                .by_uuid
                .values()
                .filter(|e| e.registered)
                .map(|e| (e.id, e.uuid_str()))
                .collect();
        }
        if let Some(path) = self.cfg.engine_state_file.clone() {
            if let Err(e) = self.engines.save_state(&path) {
                log_at!(Level::Warning, "cannot save engine state: {e}");
            }
        }
    }

    // ----- heartbeat -------------------------------------------------------------------------

    fn on_pong(&mut self, frames: Vec<RecvFrame>) {
        if frames.len() != 2 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(
                Level::Debug,
                "dropped heartbeat reply with {} frames",
                frames.len()
            );
            return;
        }
        let uuid = frames[0].as_ref();
        let Some(beat) = self.heart.beat_of(frames[1].as_ref()) else {
            return;
        };
        let Some(e) = self.engines.by_uuid.get_mut(uuid) else {
            return;
        };
        e.last_beat = e.last_beat.max(beat);
        if !e.registered {
            let uuid = uuid.to_vec();
            self.register(&uuid);
        }
    }

    /// A monitor event of the heartbeat socket: a closed connection starts a [`Probe`].
    fn on_heartbeat_disconnect(&mut self, frames: &[RecvFrame]) {
        let head = frames.first().map(|f| f.as_ref()).unwrap_or(&[]);
        if head.len() < 2 {
            return;
        }
        let event = u16::from_ne_bytes([head[0], head[1]]);
        if event != zmq::SocketEvent::DISCONNECTED.to_raw() {
            return;
        }
        let now = Instant::now();
        self.heart.beat += 1;
        self.heart.probe = Some(Probe {
            beat: self.heart.beat,
            deadline: now + PROBE_GRACE,
            next_ping: now + PROBE_PING,
        });
        log_at!(
            Level::Debug,
            "a heartbeat connection closed: checking every engine"
        );
        self.ping();
    }

    /// Drop the engines that answered none of the probe's pings (at its deadline), or ping.
    fn probe_timer(&mut self, now: Instant) {
        let Some(mut probe) = self.heart.probe else {
            return;
        };
        if now >= probe.deadline {
            self.heart.probe = None;
            let silent: Vec<Vec<u8>> = self
                .engines
                .by_uuid
                .values()
                .filter(|e| e.registered && e.last_beat < probe.beat)
                .map(|e| e.uuid.clone())
                .collect();
            for uuid in silent {
                self.unregister(
                    &uuid,
                    "its heartbeat connection closed and it stopped answering",
                );
            }
        } else if now >= probe.next_ping {
            probe.next_ping = now + PROBE_PING;
            self.heart.probe = Some(probe);
            self.ping();
        }
    }

    pub(crate) fn ping(&mut self) {
        let payload = self.heart.ping_payload();
        let _ = self.send(HB_PING, vec![OutFrame::Owned(payload)]);
    }

    pub(crate) fn timers(&mut self) {
        self.task_timeouts();
        let now = Instant::now();
        self.expire_links();
        self.probe_timer(now);
        if let Some(t) = self.heart.next_fast_ping {
            if now >= t {
                let pending = self.engines.by_uuid.values().any(|e| !e.registered);
                if pending {
                    self.ping();
                    self.heart.next_fast_ping = Some(now + FAST_PING);
                } else {
                    self.heart.next_fast_ping = None;
                }
            }
        }
        if now < self.heart.next_beat {
            return;
        }
        let beat = self.heart.beat;
        let max = self.heart.max_misses;
        let mut dead = Vec::new();
        let mut stalled = Vec::new();
        for e in self.engines.by_uuid.values() {
            if e.registered && beat.saturating_sub(e.last_beat) > max {
                dead.push(e.uuid.clone());
            } else if !e.registered && now >= e.stall_deadline {
                stalled.push(e.uuid.clone());
            }
        }
        for uuid in dead {
            self.unregister(&uuid, "heartbeat stopped");
        }
        for uuid in stalled {
            self.unregister(&uuid, "no heartbeat before the registration timeout");
        }
        self.heart.beat += 1;
        self.ping();
        self.heart.next_beat = now + self.heart.period;
    }

    /// Publish `shutdown_notification` (its parent is the client's `shutdown_request`, or
    /// empty when the controller stops on its own, as ipyparallel's hub) and stop soon.
    fn begin_shutdown(&mut self, parent: Value) {
        if self.shutdown_at.is_none() {
            self.send_new(
                NOTIF,
                Vec::new(),
                "shutdown_notification",
                Value::map([("status", Value::from("ok"))]),
                parent,
                Value::empty_map(),
            );
            self.shutdown_at = Some(Instant::now() + SHUTDOWN_GRACE);
        }
    }

    // ----- MUX and control relays -----------------------------------------------------------

    fn on_client_relay(&mut self, env: Env, from: usize, to: usize, track: bool) {
        if env.idents.len() < 2 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(
                Level::Warning,
                "dropped a message too short to route (no target engine)"
            );
            return;
        }
        let Some((header, msg_id, msg_type)) = self.header_of(&env) else {
            return;
        };
        if !self.is_request(&msg_type, if track { "MUX" } else { "control" }) {
            return;
        }
        let client = env.idents[0].as_ref().to_vec();
        let target = env.idents[1].as_ref().to_vec();
        if msg_type == "abort_request" && !self.tasks.stealing.is_empty() {
            self.user_aborts(&env);
        }
        if target == FANOUT {
            self.fan_out(env, from, to, track, client, header, msg_type);
            return;
        }
        let captured = if track {
            self.records.capture(&env)
        } else {
            None
        };
        let mut env = env;
        let rest: Vec<RecvFrame> = env.idents.drain(2..).collect();
        let mut idents = vec![ident(&target), ident(&client)];
        idents.extend(rest.into_iter().map(OutFrame::Received));
        let frames = frames_of(idents, env);
        match self.send(to, frames) {
            Ok(()) => {
                if track {
                    self.records
                        .on_request("mux", &header, captured, Some(&target));
                    if let Some(e) = self.engines.by_uuid.get_mut(&target) {
                        e.mux.insert(
                            msg_id,
                            InFlight {
                                client,
                                header,
                                msg_type,
                            },
                        );
                    }
                }
            }
            Err(_) => {
                let uuid_s = show(&target);
                let evalue = format!("engine {uuid_s} is not connected to the controller");
                log_at!(Level::Warning, "cannot route {msg_type}: {evalue}");
                let content = hub_error_content("EngineError", &evalue);
                self.send_new(
                    from,
                    vec![client, target],
                    &reply_type(&msg_type),
                    content,
                    header,
                    error_metadata(Some(&uuid_s)),
                );
            }
        }
    }

    /// One request for many engines: `metadata.fanout` lists the engines, each as its uuid
    /// (the engine's copy then gets the msg_id `<msg_id>_<uuid>`, and the k-th repeat of a
    /// uuid in the list, k >= 1, `<msg_id>_<uuid>_<k>`) or as an `[engine_uuid, msg_id]` pair.
    /// Each engine gets the same frames (bodies shared, not copied) under its own msg_id, with
    /// the header re-signed by the controller.
    #[allow(clippy::too_many_arguments)]
    fn fan_out(
        &mut self,
        env: Env,
        from: usize,
        to: usize,
        track: bool,
        client: Vec<u8>,
        header: Value,
        msg_type: String,
    ) {
        let Some(metadata) = self.unpack(&env, "metadata") else {
            return;
        };
        let base = str_field(&header, "msg_id").unwrap_or_default().to_owned();
        let pairs = match metadata.get("fanout").and_then(Value::as_array) {
            Some(items) => fanout_targets(&base, items),
            None => Vec::new(),
        };
        if pairs.is_empty() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(
                Level::Warning,
                "dropped a fan-out request without metadata.fanout targets"
            );
            return;
        }
        let captured = if track {
            self.records.capture(&env)
        } else {
            None
        };
        for (uuid, msg_id) in pairs {
            let mut h = header.clone();
            h.set("msg_id", Value::Str(msg_id.clone()));
            let route = vec![ident(&uuid), ident(&client)];
            let Some((frames, packed)) = self.resigned(route, &h, &env, None) else {
                continue;
            };
            let copy = captured.clone().map(|mut c| {
                c.header = packed;
                c
            });
            match self.send(to, frames) {
                Ok(()) => {
                    if track {
                        self.records.on_request("mux", &h, copy, Some(&uuid));
                        if let Some(e) = self.engines.by_uuid.get_mut(&uuid) {
                            let req = InFlight {
                                client: client.clone(),
                                header: h,
                                msg_type: msg_type.clone(),
                            };
                            e.mux.insert(msg_id, req);
                        }
                    }
                }
                Err(_) => {
                    let uuid_s = show(&uuid);
                    let evalue = format!("engine {uuid_s} is not connected to the controller");
                    let content = hub_error_content("EngineError", &evalue);
                    self.send_new(
                        from,
                        vec![client.clone(), uuid.clone()],
                        &reply_type(&msg_type),
                        content,
                        h,
                        error_metadata(Some(&uuid_s)),
                    );
                }
            }
        }
    }

    /// The frames of `env` under another header (`header`, packed here) and optionally
    /// other packed metadata, re-signed by the controller, after the routing frames `route`;
    /// the bodies of the other parts and of the buffers are shared, not copied. Also returns
    /// the packed header. `None` (logged) if the header cannot be packed.
    pub(crate) fn resigned(
        &self,
        route: Vec<OutFrame>,
        header: &Value,
        env: &Env,
        metadata: Option<&[u8]>,
    ) -> Option<(Vec<OutFrame>, Vec<u8>)> {
        let packed = match self.session.packer.pack(header) {
            Ok(p) => p,
            Err(e) => {
                log_at!(Level::Error, "cannot repack a header: {e}");
                return None;
            }
        };
        let md = metadata.unwrap_or(env.metadata.as_ref());
        let sig = self.session.sign_packed(&[
            &packed,
            env.parent_header.as_ref(),
            md,
            env.content.as_ref(),
        ]);
        let mut frames = route;
        frames.reserve(6 + env.buffers.len());
        frames.extend([
            OutFrame::Owned(DELIMITER.to_vec()),
            OutFrame::Owned(sig),
            OutFrame::Owned(packed.clone()),
            OutFrame::Received(env.parent_header.share()),
            match metadata {
                Some(m) => OutFrame::Owned(m.to_vec()),
                None => OutFrame::Received(env.metadata.share()),
            },
            OutFrame::Received(env.content.share()),
        ]);
        frames.extend(env.buffers.iter().map(|b| OutFrame::Received(b.share())));
        Some((frames, packed))
    }

    fn on_engine_reply(&mut self, env: Env, to: usize, track: bool) {
        if env.idents.len() < 2 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(Level::Warning, "dropped an engine reply too short to route");
            return;
        }
        let engine = env.idents[0].as_ref().to_vec();
        let client = env.idents[1].as_ref().to_vec();
        if client == STEAL_IDENT {
            return; // the engine's answer to the scheduler's own abort_request
        }
        if track {
            if let Some([Some(id)]) = self.fields(&env, "parent_header", ["msg_id"]) {
                if let Some(msg_id) = id.as_str() {
                    self.records.on_reply(msg_id, &engine, &env);
                    if let Some(e) = self.engines.by_uuid.get_mut(&engine) {
                        if let Some((key, _)) = e.mux.remove_entry(msg_id) {
                            e.completed.push(key);
                        }
                    }
                }
            }
        }
        let mut env = env;
        let rest: Vec<RecvFrame> = env.idents.drain(2..).collect();
        let mut idents = vec![ident(&client), ident(&engine)];
        idents.extend(rest.into_iter().map(OutFrame::Received));
        let frames = frames_of(idents, env);
        let _ = self.send(to, frames);
    }

    // ----- IOPub -----------------------------------------------------------------------------

    fn on_iopub(&mut self, env: Env) {
        let Some((header, _, msg_type)) = self.header_of(&env) else {
            return;
        };
        if msg_type == "shutdown_reply" {
            if let Some(session) = str_field(&header, "session") {
                let uuid = session.as_bytes().to_vec();
                self.unregister(&uuid, "it shut down");
            }
        }
        self.records.on_iopub(&msg_type, &env);
        let mut env = env;
        let idents: Vec<OutFrame> = env.idents.drain(..).map(OutFrame::Received).collect();
        let frames = frames_of(idents, env);
        let _ = self.send(IOP_C, frames);
    }
}

/// The `(engine uuid, msg_id)` of each item of a fan-out request's `metadata.fanout` (see
/// `Server::fan_out`); malformed items are left out.
fn fanout_targets(base: &str, items: &[Value]) -> Vec<(Vec<u8>, String)> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    items
        .iter()
        .filter_map(|item| {
            if let Some(uuid) = item.as_str() {
                let k = seen.entry(uuid).or_insert(0);
                let msg_id = match *k {
                    0 => format!("{base}_{uuid}"),
                    k => format!("{base}_{uuid}_{k}"),
                };
                *k += 1;
                return Some((uuid.as_bytes().to_vec(), msg_id));
            }
            let p = item.as_array()?;
            Some((
                p.first()?.as_str()?.as_bytes().to_vec(),
                p.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod fanout_tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.to_owned())
    }

    #[test]
    fn targets_from_uuids_pairs_and_repeats() {
        let items = [
            s("e1"),
            s("e2"),
            s("e1"),
            Value::Array(vec![s("e3"), s("given")]),
            Value::Int(7),
            s("e1"),
        ];
        let got: Vec<(String, String)> = fanout_targets("m", &items)
            .into_iter()
            .map(|(u, m)| (String::from_utf8(u).unwrap(), m))
            .collect();
        let want = [
            ("e1", "m_e1"),
            ("e2", "m_e2"),
            ("e1", "m_e1_1"),
            ("e3", "given"),
            ("e1", "m_e1_2"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(u, m)| (u.to_string(), m.to_string()))
            .collect();
        assert_eq!(got, want);
    }
}
