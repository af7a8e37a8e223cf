//! The broadcast channel (ipyparallel 7+'s broadcast scheduler, reference §8.7), as a tree of
//! depth 0: the root is its only leaf.
//!
//! A client sends one request to the root with `metadata.targets` = `[[uuid, id], …]` and
//! `metadata.is_coalescing`. Each target engine gets the request under the msg_id
//! `<original>_<uuid>` with `metadata.original_msg_id` set, from the leaf socket (whose
//! identity is `sub_scheduler_0`, the first routing frame engines see). Replies go back to the
//! client one by one, unchanged, or — coalescing — as one message: the last reply's header,
//! parent and content, `metadata.broadcast_targets` listing the targets in request order, and
//! the replies' buffers concatenated in that order. As in ipyparallel, the hub keeps no records
//! of broadcast requests. Unlike ipyparallel, a target that is not connected, or that dies
//! before it answers, gets an `EngineError` reply instead of leaving the client waiting.

use foldhash::HashMap;
use std::sync::atomic::Ordering;

use fp_io::{OutFrame, OutgoingMessage, RecvFrame};
use fp_wire::{Parts, Value, BUFFERS_DIGEST_KEY};

use crate::log::{log_at, Level};
use crate::messages::{error_metadata, hub_error_content, reply_type, str_field};
use crate::server::{ident, show, Env, Server, BCAST_C, BCAST_E};

/// The routing identity of the leaf socket, as ipyparallel names its depth-0 scheduler.
pub const LEAF_IDENTITY: &[u8] = b"sub_scheduler_0";

/// A broadcast request forwarded to one engine and not yet answered.
#[derive(Debug, Clone)]
pub struct BcastInFlight {
    /// Routing frames back to the client (its identity first).
    pub idents: Vec<Vec<u8>>,
    /// The header the engine got (msg_id `<original>_<uuid>`).
    pub header: Value,
    pub msg_type: String,
    pub original: String,
    pub coalescing: bool,
}

/// What one target of a coalescing request has sent so far.
enum Slot {
    Pending,
    Done(Vec<RecvFrame>),
    Failed(Value),
}

/// A coalescing request waiting for its targets.
struct Coalesce {
    idents: Vec<Vec<u8>>,
    /// The request header (original msg_id) and type, for an error reply.
    header: Value,
    msg_type: String,
    /// `(uuid, target entry as the client gave it)` in request order.
    targets: Vec<(String, Value)>,
    slots: HashMap<String, Slot>,
    /// The reply that arrived last (its header, parent and content are the coalesced ones).
    last: Option<Env>,
}

/// Coalescing requests in progress, by original msg_id.
#[derive(Default)]
pub struct BroadcastState {
    coalescing: HashMap<String, Coalesce>,
}

/// The uuid of a target entry: `[uuid, id]` (ipyparallel) or a bare uuid string.
fn target_uuid(t: &Value) -> Option<String> {
    match t {
        Value::Str(s) => Some(s.clone()),
        Value::Array(items) => items.first()?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn without_digest(metadata: Value) -> Value {
    match metadata {
        Value::Map(items) => Value::Map(
            items
                .into_iter()
                .filter(|(k, _)| !matches!(k, Value::Str(s) if s == BUFFERS_DIGEST_KEY))
                .collect(),
        ),
        other => other,
    }
}

impl Server {
    /// A request from a client on the broadcast root.
    pub(crate) fn on_broadcast_submit(&mut self, env: Env) {
        let Some((header, msg_id, msg_type)) = self.header_of(&env) else {
            return;
        };
        let Some(mut metadata) = self.unpack(&env, "metadata") else {
            return;
        };
        let idents: Vec<Vec<u8>> = env.idents.iter().map(|f| f.as_ref().to_vec()).collect();
        if idents.is_empty() {
            log_at!(
                Level::Warning,
                "dropped a broadcast request without a sender"
            );
            return;
        }
        let targets: Vec<(String, Value)> = metadata
            .get("targets")
            .and_then(Value::as_array)
            .unwrap_or(&[])
            .iter()
            .filter_map(|t| Some((target_uuid(t)?, t.clone())))
            .collect();
        if targets.is_empty() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(
                Level::Warning,
                "dropped broadcast {msg_type} {msg_id}: metadata.targets lists no engine"
            );
            return;
        }
        let coalescing = matches!(metadata.get("is_coalescing"), Some(Value::Bool(true)));
        let original = match str_field(&metadata, "original_msg_id") {
            Some(o) => o.to_owned(),
            None => {
                metadata.set("original_msg_id", Value::Str(msg_id.clone()));
                msg_id.clone()
            }
        };
        let packed_md = match self.session.packer.pack(&metadata) {
            Ok(p) => p,
            Err(e) => {
                log_at!(Level::Error, "cannot repack broadcast metadata: {e}");
                return;
            }
        };
        if coalescing {
            self.broadcast.coalescing.insert(
                original.clone(),
                Coalesce {
                    idents: idents.clone(),
                    header: header.clone(),
                    msg_type: msg_type.clone(),
                    targets: targets.clone(),
                    slots: targets
                        .iter()
                        .map(|(u, _)| (u.clone(), Slot::Pending))
                        .collect(),
                    last: None,
                },
            );
        }
        for (uuid, _) in &targets {
            let mut h = header.clone();
            let engine_msg_id = format!("{original}_{uuid}");
            h.set("msg_id", Value::Str(engine_msg_id.clone()));
            let mut route = vec![ident(uuid.as_bytes())];
            route.extend(idents.iter().map(|i| ident(i)));
            let Some((frames, _)) = self.resigned(route, &h, &env, Some(&packed_md)) else {
                continue;
            };
            let req = BcastInFlight {
                idents: idents.clone(),
                header: h,
                msg_type: msg_type.clone(),
                original: original.clone(),
                coalescing,
            };
            let registered = self
                .engines
                .by_uuid
                .get(uuid.as_bytes())
                .is_some_and(|e| e.registered);
            if registered && self.send(BCAST_E, frames).is_ok() {
                if let Some(e) = self.engines.by_uuid.get_mut(uuid.as_bytes()) {
                    e.bcast.insert(engine_msg_id, req);
                }
            } else {
                let evalue = format!("engine {uuid} is not connected to the controller");
                log_at!(Level::Warning, "cannot broadcast {msg_type}: {evalue}");
                let content = hub_error_content("EngineError", &evalue);
                self.fail_broadcast(uuid.as_bytes(), req, content);
            }
        }
    }

    /// A reply from an engine on the leaf.
    pub(crate) fn on_broadcast_reply(&mut self, env: Env) {
        if env.idents.len() < 2 {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            log_at!(
                Level::Warning,
                "dropped a broadcast reply too short to route"
            );
            return;
        }
        let engine = env.idents[0].as_ref().to_vec();
        let Some(parent) = self.unpack(&env, "parent_header") else {
            return;
        };
        let in_flight = str_field(&parent, "msg_id").and_then(|id| {
            self.engines
                .by_uuid
                .get_mut(&engine)
                .and_then(|e| e.bcast.remove(id))
        });
        let coalescing = match &in_flight {
            Some(req) => req.coalescing,
            None => self
                .unpack(&env, "metadata")
                .is_some_and(|m| matches!(m.get("is_coalescing"), Some(Value::Bool(true)))),
        };
        if !coalescing {
            let mut env = env;
            let idents: Vec<OutFrame> = env
                .idents
                .drain(..)
                .skip(1)
                .map(OutFrame::Received)
                .collect();
            let frames = crate::server::frames_of(idents, env);
            let _ = self.send(BCAST_C, frames);
            return;
        }
        let Some(req) = in_flight else {
            log_at!(
                Level::Debug,
                "dropped a coalescing broadcast reply of no request in progress"
            );
            return;
        };
        let uuid = show(&engine);
        let checked = self.session.check_packed_buffers(
            Some(env.metadata.as_ref()),
            env.buffers.iter().map(|b| b.as_ref()),
        );
        let slot = match checked {
            Ok(()) => Slot::Done(env.buffers.iter().map(RecvFrame::share).collect()),
            Err(e) => {
                log_at!(Level::Warning, "broadcast reply from {uuid}: {e}");
                Slot::Failed(hub_error_content(
                    "EngineError",
                    &format!("the reply of engine {uuid} failed verification: {e}"),
                ))
            }
        };
        if let Some(c) = self.broadcast.coalescing.get_mut(&req.original) {
            c.slots.insert(uuid, slot);
            c.last = Some(env);
        }
        self.finish_coalescing(&req.original);
    }

    /// A broadcast request that one engine will not answer (not connected, or died): an error
    /// reply for it, or its slot of a coalescing request failed.
    pub(crate) fn fail_broadcast(&mut self, uuid: &[u8], req: BcastInFlight, content: Value) {
        self.stats.engine_errors.fetch_add(1, Ordering::Relaxed);
        let uuid_s = show(uuid);
        if req.coalescing {
            if let Some(c) = self.broadcast.coalescing.get_mut(&req.original) {
                c.slots.insert(uuid_s, Slot::Failed(content));
            }
            self.finish_coalescing(&req.original);
            return;
        }
        let mut md = error_metadata(Some(&uuid_s));
        md.set("original_msg_id", Value::Str(req.original.clone()));
        md.set("is_broadcast", Value::Bool(true));
        md.set("is_coalescing", Value::Bool(false));
        self.send_new(
            BCAST_C,
            req.idents,
            &reply_type(&req.msg_type),
            content,
            req.header,
            md,
        );
    }

    /// Send the coalesced reply of `original` once every target has answered, or at once as
    /// an error when one failed (replies still to come for it are then dropped).
    fn finish_coalescing(&mut self, original: &str) {
        let done = self.broadcast.coalescing.get(original).is_some_and(|c| {
            c.slots.values().any(|s| matches!(s, Slot::Failed(_)))
                || c.slots.values().all(|s| !matches!(s, Slot::Pending))
        });
        if !done {
            return;
        }
        let Some(c) = self.broadcast.coalescing.remove(original) else {
            return;
        };
        let listed = Value::Array(c.targets.iter().map(|(_, t)| t.clone()).collect());
        let failure = c.targets.iter().find_map(|(u, _)| match c.slots.get(u) {
            Some(Slot::Failed(content)) => Some(content.clone()),
            _ => None,
        });
        let reply = match (failure, c.last) {
            (None, Some(last)) => self.coalesced_parts(&last),
            (Some(content), _) => Some(Parts {
                header: self.session.headers.header(&reply_type(&c.msg_type)),
                parent_header: c.header.clone(),
                metadata: error_metadata(None),
                content,
            }),
            (None, None) => None,
        };
        let Some(mut parts) = reply else {
            return;
        };
        parts.metadata.set("broadcast_targets", listed);
        parts
            .metadata
            .set("original_msg_id", Value::Str(original.to_owned()));
        parts.metadata.set("is_coalescing", Value::Bool(true));
        let mut buffers = Vec::new();
        if parts.metadata.get("status").and_then(Value::as_str) != Some("error") {
            for (u, _) in &c.targets {
                if let Some(Slot::Done(b)) = c.slots.get(u) {
                    buffers.extend(b.iter().map(|f| OutFrame::Received(f.share())));
                }
            }
        }
        match self.session.build_frames(OutgoingMessage {
            idents: c.idents,
            parts,
            buffers,
        }) {
            Ok(frames) => {
                let _ = self.send(BCAST_C, frames);
            }
            Err(e) => log_at!(Level::Error, "cannot build a coalesced reply: {e}"),
        }
    }

    /// The four parts of the last reply, its metadata without the buffers digest (the
    /// coalesced message gets its own).
    fn coalesced_parts(&mut self, last: &Env) -> Option<Parts> {
        Some(Parts {
            header: self.unpack(last, "header")?,
            parent_header: self.unpack(last, "parent_header")?,
            metadata: without_digest(self.unpack(last, "metadata")?),
            content: self.unpack(last, "content")?,
        })
    }
}
