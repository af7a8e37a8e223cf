//! Fuzzing harness: drives the controller's message handling (hub queries, registration,
//! heartbeats, MUX/control relays, task scheduling, IOPub) without a network. Shared by the
//! `cargo fuzz` target `hub_messages` and the corpus regression test that runs on stable
//! (`tests/fuzz_corpus.rs`). Not a public API.
//!
//! The controller gets its real sockets, created but never bound or connected: whatever it
//! sends is dropped (or, with mandatory routing, fails as for a vanished engine).
//!
//! Input layout: a config byte ([`config`]), then operations, each an op byte ([`op`]), a
//! frame count byte (modulo 16) and that many frames in the layout of
//! [`fp_wire::fuzzing::FrameReader`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use fp_io::RecvFrame;
use fp_wire::fuzzing::{make_genuine, FrameReader, KEY};
use fp_wire::{Auth, Packer};

use crate::server::{Server, CTL_E, MUX_E, TASK_E};
use crate::{channel_socket, ControllerConfig, Scheme, CHANNELS};

/// Bits of the config byte.
pub mod config {
    /// Sign with [`super::KEY`] (else the controller has no key).
    pub const KEYED: u8 = 1;
    /// JSON packer (else msgpack).
    pub const JSON: u8 = 2;
    /// Bits 2..5: scheduling scheme (modulo 5).
    pub const SCHEME_SHIFT: u8 = 2;
    /// Routing to engines is mandatory (sends to unknown engines fail, as in production).
    /// Without it sends "succeed", which lets tasks and requests be assigned.
    pub const MANDATORY: u8 = 0x20;
    /// A high-water mark of 1 (else 0: unlimited).
    pub const HWM1: u8 = 0x40;
}

/// Bits of an op byte.
pub mod op {
    /// Low 4 bits: the channel (index in [`crate::CHANNELS`]); 14 and 15 force a heartbeat.
    pub const CHANNEL: u8 = 0x0f;
    /// Sign the message correctly.
    pub const SIGN: u8 = 0x10;
    /// Replace the last frame by the controller's latest ping payload (for heartbeat replies).
    pub const PONG: u8 = 0x20;
    /// Add the buffers digest to the metadata before signing.
    pub const DIGEST: u8 = 0x40;
}

const SCHEMES: [Scheme; 5] = [
    Scheme::LeastLoad,
    Scheme::Lru,
    Scheme::TwoBin,
    Scheme::Weighted,
    Scheme::PlainRandom,
];

/// Most operations taken from one input.
const MAX_OPS: usize = 64;

thread_local! {
    /// Sockets of the previous harness, reused: creating and reaping twelve sockets per input
    /// would dominate the run time. Unbound and unconnected, they keep no state between uses.
    static SPARE: std::cell::RefCell<Option<Vec<zmq::Socket>>> = const { std::cell::RefCell::new(None) };
}

/// A controller without a network.
pub struct Harness {
    server: Server,
    auth: Auth,
    packer: Packer,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let socks = self.server.take_sockets();
        if socks.len() == CHANNELS.len() {
            SPARE.with(|s| *s.borrow_mut() = Some(socks));
        }
    }
}

impl Harness {
    /// A controller configured from a config byte (see [`config`]).
    pub fn new(config_byte: u8) -> Result<Harness, String> {
        let keyed = config_byte & config::KEYED != 0;
        let packer = if config_byte & config::JSON != 0 {
            Packer::Json
        } else {
            Packer::Msgpack
        };
        let scheme = SCHEMES[(config_byte >> config::SCHEME_SHIFT) as usize % SCHEMES.len()];
        let cfg = ControllerConfig {
            key: if keyed { KEY.to_vec() } else { Vec::new() },
            packer,
            scheme,
            hb_max_misses: 1,
            hwm: usize::from(config_byte & config::HWM1 != 0),
            ..ControllerConfig::default()
        };
        let socks = match SPARE.with(|s| s.borrow_mut().take()) {
            Some(socks) => socks,
            None => {
                let mut socks = Vec::with_capacity(CHANNELS.len());
                for (i, name) in CHANNELS.iter().enumerate() {
                    socks.push(channel_socket(i, name, None)?);
                }
                socks
            }
        };
        let mandatory = config_byte & config::MANDATORY != 0;
        for i in [MUX_E, CTL_E, TASK_E] {
            socks[i]
                .set_router_mandatory(mandatory)
                .map_err(|e| e.to_string())?;
        }
        let auth = Auth::new(&cfg.key, &cfg.signature_scheme).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server::new(cfg, socks, stop, Arc::default())?;
        server.ping();
        Ok(Harness {
            server,
            auth,
            packer,
        })
    }

    /// Handle one message as if received on channel `channel` (an index in [`CHANNELS`]);
    /// out-of-range channels force a heartbeat instead.
    pub fn feed(&mut self, channel: usize, frames: Vec<Vec<u8>>) {
        if channel >= CHANNELS.len() {
            self.beat();
            return;
        }
        let frames = frames.iter().map(|f| RecvFrame::from_bytes(f)).collect();
        self.server.handle(channel, frames);
    }

    /// Run the timers as if the heartbeat period had passed.
    pub fn beat(&mut self) {
        self.server.heart.next_beat = Instant::now();
        self.server.timers();
    }

    /// The payload of the latest ping (what an engine echoes back).
    pub fn ping_payload(&self) -> Vec<u8> {
        self.server
            .heart
            .last_payload()
            .unwrap_or_default()
            .to_vec()
    }

    /// Apply one operation (see [`op`]).
    pub fn apply(&mut self, op_byte: u8, mut frames: Vec<Vec<u8>>) {
        if op_byte & op::PONG != 0 {
            if let Some(last) = frames.last_mut() {
                *last = self.ping_payload();
            }
        }
        if op_byte & op::SIGN != 0 {
            make_genuine(
                &mut frames,
                &self.auth,
                self.packer,
                op_byte & op::DIGEST != 0,
            );
        }
        self.feed((op_byte & op::CHANNEL) as usize, frames);
    }

    /// Registered engines.
    pub fn engines(&self) -> usize {
        self.server.engines.registered_count()
    }
}

/// Run one fuzz input through a fresh controller; panics only on a real bug.
pub fn hub_messages(data: &[u8]) {
    let mut r = FrameReader::new(data);
    let Some(config_byte) = r.byte() else {
        return;
    };
    let mut h = match Harness::new(config_byte) {
        Ok(h) => h,
        Err(e) => panic!("cannot build the harness: {e}"),
    };
    for _ in 0..MAX_OPS {
        let (Some(op_byte), Some(count)) = (r.byte(), r.byte()) else {
            break;
        };
        let mut frames = Vec::new();
        for _ in 0..count % 16 {
            match r.frame() {
                Some(f) => frames.push(f),
                None => break,
            }
        }
        h.apply(op_byte, frames);
    }
}

/// Encode operations as a [`hub_messages`] input (for seeds).
pub fn encode_ops(config_byte: u8, ops: &[(u8, Vec<Vec<u8>>)]) -> Vec<u8> {
    let mut out = vec![config_byte];
    for (op_byte, frames) in ops {
        out.push(*op_byte);
        out.push(frames.len() as u8);
        fp_wire::fuzzing::encode_frames(&mut out, frames);
    }
    out
}

fn header(msg_type: &str, msg_id: &str, session: &str) -> fp_wire::Value {
    use fp_wire::Value;
    Value::map([
        ("msg_id", Value::from(msg_id)),
        ("msg_type", Value::from(msg_type)),
        ("session", Value::from(session)),
        ("username", Value::from("fuzz")),
        ("date", Value::from("2026-01-01T00:00:00.000000Z")),
        ("version", Value::from(fp_wire::PROTOCOL_VERSION)),
    ])
}

/// Frames of one message: idents, delimiter, an empty signature (the op's SIGN bit fills it
/// in), the four packed parts and the buffers.
#[allow(clippy::too_many_arguments)]
fn message(
    packer: Packer,
    idents: &[&[u8]],
    msg_type: &str,
    msg_id: &str,
    parent_id: Option<&str>,
    metadata: fp_wire::Value,
    content: fp_wire::Value,
    buffers: &[&[u8]],
) -> Vec<Vec<u8>> {
    use fp_wire::Value;
    let parent = match parent_id {
        Some(id) => header("apply_request", id, "client"),
        None => Value::empty_map(),
    };
    let mut f: Vec<Vec<u8>> = idents.iter().map(|i| i.to_vec()).collect();
    f.push(fp_wire::DELIMITER.to_vec());
    f.push(Vec::new());
    for part in [
        &header(msg_type, msg_id, "client"),
        &parent,
        &metadata,
        &content,
    ] {
        f.push(packer.pack(part).unwrap_or_default());
    }
    f.extend(buffers.iter().map(|b| b.to_vec()));
    f
}

/// Seed inputs for [`hub_messages`]: realistic sessions (registration, heartbeat, direct and
/// load-balanced requests and replies, fan-out, every hub query, IOPub, engine death) under
/// several configurations. Returned as (name, input).
pub fn seed_inputs() -> Vec<(String, Vec<u8>)> {
    use fp_wire::Value;
    use op::{DIGEST, PONG, SIGN};
    let s = |v: &str| Value::from(v);
    let ids = |v: &[&str]| Value::Array(v.iter().map(|x| Value::from(*x)).collect());
    let mut seeds = Vec::new();
    for (name, cfg) in [
        ("msgpack-keyed", config::KEYED),
        (
            "json-keyed-lru-mandatory",
            config::KEYED | config::JSON | 1 << 2 | config::MANDATORY,
        ),
        ("msgpack-nokey-twobin-hwm1", 2 << 2 | config::HWM1),
        ("json-nokey-weighted", config::JSON | 3 << 2),
    ] {
        let p = if cfg & config::JSON != 0 {
            Packer::Json
        } else {
            Packer::Msgpack
        };
        let c: &[u8] = b"client-1";
        let e: &[u8] = b"engine-1";
        let task_md = Value::map([
            ("targets", ids(&[])),
            ("after", ids(&[])),
            ("follow", ids(&[])),
            ("timeout", Value::Nil),
            ("retries", Value::Int(1)),
        ]);
        let dep_md = Value::map([
            ("targets", ids(&["engine-1"])),
            (
                "after",
                Value::map([("dependencies", ids(&["t1"])), ("all", Value::Bool(true))]),
            ),
            ("follow", ids(&["m1"])),
            ("timeout", Value::Float(0.0)),
            ("retries", Value::Int(0)),
        ]);
        let ok_md = Value::map([
            ("status", s("ok")),
            ("dependencies_met", Value::Bool(true)),
            ("engine", s("engine-1")),
        ]);
        let ok = Value::map([("status", s("ok"))]);
        let bufs: &[&[u8]] = &[b"fn", b"args", b"kwargs"];
        let reg = |ty: &str, id: &str, content: Value| {
            message(p, &[c], ty, id, None, Value::empty_map(), content, &[])
        };
        let ops: Vec<(u8, Vec<Vec<u8>>)> = vec![
            (
                SIGN,
                reg(
                    "registration_request",
                    "r1",
                    Value::map([("uuid", s("engine-1")), ("id", Value::Nil)]),
                ),
            ),
            (11 | PONG, vec![e.to_vec(), Vec::new()]),
            (SIGN, reg("connection_request", "r2", Value::empty_map())),
            (
                6 | SIGN | DIGEST,
                message(
                    p,
                    &[c],
                    "apply_request",
                    "t1",
                    None,
                    task_md.clone(),
                    Value::empty_map(),
                    bufs,
                ),
            ),
            (
                6 | SIGN | DIGEST,
                message(
                    p,
                    &[c],
                    "apply_request",
                    "t2",
                    None,
                    dep_md,
                    Value::empty_map(),
                    bufs,
                ),
            ),
            (
                7 | SIGN | DIGEST,
                message(
                    p,
                    &[e, c],
                    "apply_reply",
                    "t1r",
                    Some("t1"),
                    ok_md.clone(),
                    ok.clone(),
                    &[b"result"],
                ),
            ),
            (
                2 | SIGN | DIGEST,
                message(
                    p,
                    &[c, e],
                    "apply_request",
                    "m1",
                    None,
                    Value::empty_map(),
                    Value::empty_map(),
                    bufs,
                ),
            ),
            (
                3 | SIGN,
                message(
                    p,
                    &[e, c],
                    "apply_reply",
                    "m1r",
                    Some("m1"),
                    ok_md.clone(),
                    ok.clone(),
                    &[b"r"],
                ),
            ),
            (
                2 | SIGN | DIGEST,
                message(
                    p,
                    &[c, crate::server::FANOUT],
                    "execute_request",
                    "f0",
                    None,
                    Value::map([(
                        "fanout",
                        Value::Array(vec![ids(&["engine-1", "f1"]), ids(&["engine-2", "f2"])]),
                    )]),
                    Value::map([("code", s("1+1"))]),
                    &[],
                ),
            ),
            (
                4 | SIGN,
                message(
                    p,
                    &[c, e],
                    "abort_request",
                    "a1",
                    None,
                    Value::empty_map(),
                    Value::map([("msg_ids", ids(&["t9"]))]),
                    &[],
                ),
            ),
            (
                5 | SIGN,
                message(
                    p,
                    &[e, c],
                    "abort_reply",
                    "a1r",
                    Some("a1"),
                    Value::empty_map(),
                    ok.clone(),
                    &[],
                ),
            ),
            (
                SIGN,
                reg(
                    "queue_request",
                    "q1",
                    Value::map([("targets", Value::Nil), ("verbose", Value::Bool(true))]),
                ),
            ),
            (
                SIGN,
                reg(
                    "db_request",
                    "q2",
                    Value::map([
                        (
                            "query",
                            Value::map([("msg_id", Value::map([("$in", ids(&["t1", "m1"]))]))]),
                        ),
                        ("keys", Value::Nil),
                    ]),
                ),
            ),
            (
                SIGN,
                reg(
                    "result_request",
                    "q3",
                    Value::map([("msg_ids", ids(&["t1", "m1", "zz"]))]),
                ),
            ),
            (
                SIGN,
                reg(
                    "resubmit_request",
                    "q4",
                    Value::map([("msg_ids", ids(&["t1"]))]),
                ),
            ),
            (SIGN, reg("history_request", "q5", Value::empty_map())),
            (
                SIGN,
                reg(
                    "abort_request",
                    "q6",
                    Value::map([("msg_ids", ids(&["t2"]))]),
                ),
            ),
            (
                9 | SIGN,
                message(
                    p,
                    &[b"engine.0.stream"],
                    "stream",
                    "s1",
                    Some("t1"),
                    Value::empty_map(),
                    Value::map([("name", s("stdout")), ("text", s("hi"))]),
                    &[],
                ),
            ),
            (
                6 | SIGN,
                message(
                    p,
                    &[c],
                    "apply_request",
                    "t3",
                    None,
                    task_md,
                    Value::empty_map(),
                    bufs,
                ),
            ),
            (15, Vec::new()),
            (15, Vec::new()),
            (15, Vec::new()),
            (
                SIGN,
                reg(
                    "purge_request",
                    "q7",
                    Value::map([
                        ("msg_ids", s("all")),
                        ("engine_ids", Value::Array(vec![Value::Int(0)])),
                    ]),
                ),
            ),
            (
                SIGN,
                reg(
                    "unregistration_request",
                    "q8",
                    Value::map([("id", Value::Int(0))]),
                ),
            ),
            (SIGN, reg("shutdown_request", "q9", Value::empty_map())),
        ];
        seeds.push((format!("session-{name}"), encode_ops(cfg, &ops)));
        // Each message on its own, too: shorter inputs mutate better.
        for (i, one) in ops.iter().enumerate() {
            let reg_first = &ops[..2];
            let mut few = reg_first.to_vec();
            few.push(one.clone());
            seeds.push((format!("op{i:02}-{name}"), encode_ops(cfg, &few)));
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp_wire::Value;

    /// Found by `cargo fuzz run hub_messages`: a task `timeout` too large for a `Duration`
    /// (or for an `Instant`) panicked the controller thread.
    #[test]
    fn huge_task_timeouts_do_not_panic() {
        for timeout in [1e300, 1e18, f64::MAX, 1e-300, -1.0] {
            let mut h = Harness::new(config::KEYED).unwrap();
            let md = Value::map([("timeout", Value::Float(timeout))]);
            let frames = message(
                Packer::Msgpack,
                &[b"client"],
                "apply_request",
                "t1",
                None,
                md,
                Value::empty_map(),
                &[b"f"],
            );
            h.apply(crate::server::TASK_C as u8 | op::SIGN, frames);
            h.beat();
        }
    }

    #[test]
    fn a_seed_session_registers_an_engine() {
        let mut h = Harness::new(config::KEYED).unwrap();
        for (_, input) in seed_inputs().iter().take(1) {
            hub_messages(input);
        }
        let seeds = seed_inputs();
        let (_, first) = &seeds[0];
        // Replay the first two ops by hand: registration, then the heartbeat reply.
        let mut r = FrameReader::new(&first[1..]);
        for _ in 0..2 {
            let op_byte = r.byte().unwrap();
            let n = r.byte().unwrap();
            let frames = (0..n).map(|_| r.frame().unwrap()).collect();
            h.apply(op_byte, frames);
        }
        assert_eq!(h.engines(), 1);
        for (_, input) in &seeds {
            hub_messages(input);
        }
    }
}
