//! Hub queries on task records: `db_request`, `history_request`, `result_request`,
//! `purge_request`, `resubmit_request`. A failure is the request's own reply type with error
//! content; the controller keeps serving.

use fp_io::{OutFrame, OutgoingMessage, RecvFrame};
use fp_wire::{Envelope, Parts, Value, DELIMITER};

use super::date;
use super::query::{projection, Query, QueryError};
use super::record::{Blob, TaskRecord, Update};
use super::Captured;
use crate::engines::InFlight;
use crate::log::{log_at, Level};
use crate::messages::hub_error_content;
use crate::server::{Server, MUX_E, REG};

/// Request metadata by which a waiting ferroparallel client asks engines to lend it the
/// result (decisions 0007 and 0014); dropped from resubmitted requests.
const LENDING_KEYS: [&str; 3] = ["fp_lend_results", "fp_net_results", "fp_lent_to"];

/// Routing identity of requests the hub re-submits: their replies are dropped by the relays
/// (nobody has that identity) and reach clients through the records.
pub const HUB_IDENT: &[u8] = b"fp:hub";

/// A reply content and its buffers.
type Reply = (Value, Vec<OutFrame>);

fn ok(items: Vec<(&str, Value)>) -> Value {
    let mut v = Value::map([("status", Value::from("ok"))]);
    for (k, x) in items {
        v.set(k, x);
    }
    v
}

fn str_list(v: Option<&Value>, what: &str) -> Result<Vec<String>, QueryError> {
    match v {
        None | Some(Value::Nil) => Ok(Vec::new()),
        Some(Value::Str(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| QueryError::type_(format!("{what} must be msg_id strings")))
            })
            .collect(),
        Some(_) => Err(QueryError::type_(format!(
            "{what} must be a list of msg_ids"
        ))),
    }
}

fn project(r: &TaskRecord, fields: &[&str], packer: fp_wire::Packer) -> Value {
    Value::Map(
        fields
            .iter()
            .filter(|f| **f != "buffers" && **f != "result_buffers")
            .map(|f| (Value::from(*f), r.field(f, packer).unwrap_or(Value::Nil)))
            .collect(),
    )
}

/// Whether stored buffers match the digest in their message's signed metadata (the
/// controller forwards buffers unchecked, see `Server::verified`, and checks them here, before
/// a reply signs them under a digest of its own).
fn authentic(
    session: Option<&fp_io::SessionCore>,
    metadata: &Option<Vec<u8>>,
    buffers: &[Blob],
) -> bool {
    let Some(session) = session else {
        return true; // checked when stored
    };
    if buffers.is_empty() {
        return true;
    }
    match session.check_packed_buffers(metadata.as_deref(), buffers.iter().map(AsRef::as_ref)) {
        Ok(()) => true,
        Err(e) => {
            log_at!(Level::Warning, "stored buffers fail their digest: {e}");
            false
        }
    }
}

fn forged_error(msg_id: &str) -> QueryError {
    QueryError {
        ename: "InvalidSignature",
        evalue: format!(
            "the buffers recorded for {msg_id} do not match the digest their sender signed \
             (altered on the way to the controller); they are not served"
        ),
    }
}

impl Server {
    /// Handle a records query; false if `msg_type` is not one.
    pub(crate) fn on_records_query(
        &mut self,
        zid: Vec<u8>,
        header: Value,
        msg_type: &str,
        content: Value,
    ) -> bool {
        let result = match msg_type {
            "db_request" => self.db_request(&content),
            "history_request" => self.history_request(),
            "result_request" => self.result_request(&content),
            "purge_request" => self.purge_request(&content),
            "resubmit_request" => self.resubmit_request(&content),
            _ => return false,
        };
        let reply_type = format!("{}_reply", msg_type.trim_end_matches("_request"));
        let (reply_type, content, buffers) = match result {
            Ok((content, buffers)) => (reply_type, content, buffers),
            Err(e) => {
                log_at!(Level::Info, "{msg_type} failed: {e}");
                // the request's own reply type with error content, as ipyparallel's handlers
                // (hub_error is for requests no handler takes)
                (
                    reply_type,
                    hub_error_content(e.ename, &e.evalue),
                    Vec::new(),
                )
            }
        };
        let parts = Parts {
            header: self.session.headers.header(&reply_type),
            parent_header: header,
            metadata: Value::empty_map(),
            content,
        };
        match self.session.build_frames(OutgoingMessage {
            idents: vec![zid],
            parts,
            buffers,
        }) {
            Ok(frames) => {
                let _ = self.send(REG, frames);
            }
            Err(e) => log_at!(Level::Error, "cannot build {reply_type}: {e}"),
        }
        true
    }

    fn db_request(&mut self, content: &Value) -> Result<Reply, QueryError> {
        let query = Query::parse(content.get("query").unwrap_or(&Value::Nil))?;
        let fields = projection(content.get("keys").unwrap_or(&Value::Nil))?;
        let want_bufs = fields.contains(&"buffers");
        let want_rbufs = fields.contains(&"result_buffers");
        let packer = self.records.packer;
        let mut records = Vec::new();
        let mut lens = Vec::new();
        let mut rlens = Vec::new();
        let mut frames = Vec::new();
        let mut forged: Option<String> = None;
        let session = (!self.records.checked_when_stored()).then_some(&self.session);
        self.records.backend().find(&query, &mut |r| {
            records.push(project(r, &fields, packer));
            // as ipyparallel: the number of buffers of each record, which follow in order
            let count = |b: &[Blob]| Value::Int(b.len() as i64);
            if want_bufs {
                if !authentic(session, &r.metadata, &r.buffers) {
                    forged.get_or_insert_with(|| r.msg_id.clone());
                }
                lens.push(count(&r.buffers));
                frames.extend(r.buffers.iter().map(Blob::out_frame));
            }
            if want_rbufs {
                if !authentic(session, &r.result_metadata, &r.result_buffers) {
                    forged.get_or_insert_with(|| r.msg_id.clone());
                }
                rlens.push(count(&r.result_buffers));
                frames.extend(r.result_buffers.iter().map(Blob::out_frame));
            }
        })?;
        if let Some(id) = forged {
            return Err(forged_error(&id));
        }
        let or_nil = |want: bool, v: Vec<Value>| if want { Value::Array(v) } else { Value::Nil };
        Ok((
            ok(vec![
                ("records", Value::Array(records)),
                ("buffer_lens", or_nil(want_bufs, lens)),
                ("result_buffer_lens", or_nil(want_rbufs, rlens)),
            ]),
            frames,
        ))
    }

    fn history_request(&mut self) -> Result<Reply, QueryError> {
        let mut h = self.records.backend().history()?;
        // As ipyparallel's hub: only submitted requests. A record without a submission time
        // holds IOPub output whose request the hub never saw (a broadcast's per-engine
        // msg_ids): listing it would offer clients a result that never comes.
        h.retain(|(_, t)| t.is_some());
        // stable: arrival order among equal submission times
        h.sort_by_key(|(_, t)| t.unwrap_or(i64::MAX));
        let ids = h.into_iter().map(|(id, _)| Value::Str(id)).collect();
        Ok((ok(vec![("history", Value::Array(ids))]), Vec::new()))
    }

    fn result_request(&mut self, content: &Value) -> Result<Reply, QueryError> {
        let mut ids = str_list(content.get("msg_ids"), "msg_ids")?;
        ids.sort();
        ids.dedup();
        let status_only = !matches!(content.get("status_only"), Some(Value::Bool(false)));
        let packer = self.records.packer;
        let mut pending = Vec::new();
        let mut completed = Vec::new();
        let mut entries: Vec<(String, Value)> = Vec::new();
        let mut frames = Vec::new();
        let found = self.records.backend().get_many(&ids);
        for (id, r) in ids.iter().zip(found) {
            let r = r?;
            if r.pending() {
                pending.push(Value::Str(id.clone()));
                continue;
            }
            completed.push(Value::Str(id.clone()));
            if status_only {
                continue;
            }
            let f = |name: &str| r.field(name, packer).unwrap_or(Value::Nil);
            let io = Value::map([
                ("execute_input", f("execute_input")),
                ("execute_result", f("execute_result")),
                ("error", f("error")),
                ("stdout", f("stdout")),
                ("stderr", f("stderr")),
            ]);
            let entry = Value::map([
                ("header", f("header")),
                ("metadata", f("metadata")),
                ("result_header", f("result_header")),
                ("result_metadata", f("result_metadata")),
                ("result_content", f("result_content")),
                ("submitted", f("submitted")),
                ("started", f("started")),
                ("completed", f("completed")),
                ("received", f("received")),
                ("engine_uuid", f("engine_uuid")),
                ("resubmitted", f("resubmitted")),
                ("nbuffers", Value::Int(r.result_buffers.len() as i64)),
                ("io", io),
            ]);
            if !self.records.checked_when_stored()
                && !authentic(Some(&self.session), &r.result_metadata, &r.result_buffers)
            {
                return Err(forged_error(&r.msg_id));
            }
            frames.extend(r.result_buffers.iter().map(Blob::out_frame));
            entries.push((id.clone(), entry));
        }
        let mut reply = ok(vec![
            ("pending", Value::Array(pending)),
            ("completed", Value::Array(completed)),
        ]);
        for (id, e) in entries {
            reply.set(&id, e);
        }
        Ok((reply, frames))
    }

    fn purge_request(&mut self, content: &Value) -> Result<Reply, QueryError> {
        if !self.records.enabled() {
            // `--db none`: there is nothing to drop (as ipyparallel's NoDB)
            return Ok((ok(Vec::new()), Vec::new()));
        }
        let completed_only = |extra: Vec<(Value, Value)>| {
            let mut q = vec![(Value::from("completed"), Value::map([("$ne", Value::Nil)]))];
            q.extend(extra);
            Query::parse(&Value::Map(q))
        };
        let collect = |s: &mut Server, q: &Query| -> Result<Vec<String>, QueryError> {
            let mut ids = Vec::new();
            s.records
                .backend()
                .find(q, &mut |r| ids.push(r.msg_id.clone()))?;
            Ok(ids)
        };
        let mut doomed = Vec::new();
        match content.get("msg_ids") {
            Some(Value::Str(s)) if s == "all" => {
                doomed.extend(collect(self, &completed_only(Vec::new())?)?);
            }
            other => {
                let ids = str_list(other, "msg_ids")?;
                let mut busy = Vec::new();
                let found = self.records.backend().get_many(&ids);
                for (id, r) in ids.into_iter().zip(found) {
                    match r {
                        Ok(r) if r.pending() => busy.push(id),
                        Ok(_) => doomed.push(id),
                        Err(e) if e.ename == "KeyError" && self.records.enabled() => {}
                        Err(e) => return Err(e),
                    }
                }
                if !busy.is_empty() {
                    // IndexError, as ipyparallel's hub
                    return Err(QueryError::index(format!(
                        "cannot purge pending tasks (still running or queued): {}",
                        busy.join(", ")
                    )));
                }
            }
        }
        let engines = match content.get("engine_ids") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(one) => vec![one.clone()],
        };
        for e in engines {
            let uuid = match &e {
                Value::Str(s) => s.clone(),
                other => match other.as_i64().and_then(|id| self.engines.uuid_of(id)) {
                    Some(u) => String::from_utf8_lossy(u).into_owned(),
                    None => {
                        return Err(QueryError {
                            ename: "IndexError",
                            evalue: format!("no such engine: {other:?}"),
                        })
                    }
                },
            };
            let q = completed_only(vec![(Value::from("engine_uuid"), Value::Str(uuid))])?;
            doomed.extend(collect(self, &q)?);
        }
        self.records.remove(&doomed);
        Ok((ok(Vec::new()), Vec::new()))
    }

    fn resubmit_request(&mut self, content: &Value) -> Result<Reply, QueryError> {
        let ids = str_list(content.get("msg_ids"), "msg_ids")?;
        let mut recs = Vec::with_capacity(ids.len());
        let found = self.records.backend().get_many(&ids);
        for (id, r) in ids.iter().zip(found) {
            // A pending task is resubmitted too, as ipyparallel's hub does: the copy runs
            // under a new msg_id, and the original still completes.
            let r = r?;
            if r.header.is_none() {
                return Err(QueryError::key(format!(
                    "task {id:?} has no stored request to resubmit"
                )));
            }
            if r.queue.as_deref() == Some("mux") {
                let engine = r.engine_uuid.clone().unwrap_or_default();
                let alive = self
                    .engines
                    .by_uuid
                    .get(engine.as_bytes())
                    .is_some_and(|e| e.registered);
                if !alive {
                    return Err(QueryError {
                        ename: "EngineError",
                        evalue: format!(
                            "cannot resubmit direct task {id:?}: its engine {engine} is gone"
                        ),
                    });
                }
            }
            recs.push(r);
        }
        let mut map = Vec::new();
        for r in recs {
            let new_id = self.resubmit_one(&r)?;
            self.records
                .backend()
                .update(&r.msg_id, Update::Resubmitted(new_id.clone()));
            map.push((Value::Str(r.msg_id.clone()), Value::Str(new_id)));
        }
        Ok((ok(vec![("resubmitted", Value::Map(map))]), Vec::new()))
    }

    /// Send a stored request again under a new msg_id; returns that id.
    fn resubmit_one(&mut self, r: &TaskRecord) -> Result<String, QueryError> {
        let packer = self.records.packer;
        let old = r.field("header", packer).unwrap_or(Value::Nil);
        let msg_type = old
            .get("msg_type")
            .and_then(Value::as_str)
            .unwrap_or("apply_request")
            .to_owned();
        let new_id = self.session.headers.next_msg_id();
        let mut header = old.clone();
        header.set("msg_id", Value::Str(new_id.clone()));
        header.set("date", Value::Str(date::format(date::now())));
        let pack = |v: &Value| {
            packer
                .pack(v)
                .map_err(|e| QueryError::runtime(format!("cannot pack the new header: {e}")))
        };
        let packed_header = pack(&header)?;
        let packed_parent = pack(&old)?;
        // Nobody waits for a resubmitted request the way the original's client did: its
        // result must not be lent (the engine would wait for a pickup that never comes).
        let mut md = r.field("metadata", packer).unwrap_or_else(Value::empty_map);
        let lent = LENDING_KEYS.iter().fold(false, |any, k| md.remove(k) | any);
        let metadata = match &r.metadata {
            Some(m) if !lent => m.clone(),
            _ => pack(&md)?,
        };
        let content = r
            .content
            .clone()
            .unwrap_or_else(|| pack(&Value::empty_map()).unwrap_or_default());
        let sig = self
            .session
            .sign_packed(&[&packed_header, &packed_parent, &metadata, &content]);
        let frame = |b: &Blob| match b {
            Blob::Shared(f) => f.share(),
            Blob::Owned(v) => RecvFrame::from_bytes(v),
        };
        if r.queue.as_deref() == Some("mux") {
            let engine = r.engine_uuid.clone().unwrap_or_default().into_bytes();
            let mut frames = vec![
                OutFrame::Owned(engine.clone()),
                OutFrame::Owned(HUB_IDENT.to_vec()),
                OutFrame::Owned(DELIMITER.to_vec()),
                OutFrame::Owned(sig),
                OutFrame::Owned(packed_header.clone()),
                OutFrame::Owned(packed_parent),
                OutFrame::Owned(metadata.clone()),
                OutFrame::Owned(content.clone()),
            ];
            frames.extend(r.buffers.iter().map(Blob::out_frame));
            if self.send(MUX_E, frames).is_err() {
                return Err(QueryError {
                    ename: "EngineError",
                    evalue: format!("cannot reach engine {}", String::from_utf8_lossy(&engine)),
                });
            }
            if let Some(e) = self.engines.by_uuid.get_mut(&engine) {
                e.mux.insert(
                    new_id.clone(),
                    InFlight {
                        client: HUB_IDENT.to_vec(),
                        header: header.clone(),
                        msg_type,
                    },
                );
            }
            let cap = Captured {
                header: packed_header,
                metadata,
                content,
                buffers: r.buffers.clone(),
            };
            self.records
                .on_request("mux", &header, Some(cap), Some(&engine));
        } else {
            let env = Envelope {
                idents: vec![RecvFrame::from_bytes(HUB_IDENT)],
                signature: RecvFrame::from_bytes(&sig),
                header: RecvFrame::from_bytes(&packed_header),
                parent_header: RecvFrame::from_bytes(&packed_parent),
                metadata: RecvFrame::from_bytes(&metadata),
                content: RecvFrame::from_bytes(&content),
                buffers: r.buffers.iter().map(frame).collect(),
            };
            self.on_task_submit(env);
        }
        log_at!(Level::Info, "resubmitted {} as {new_id}", r.msg_id);
        Ok(new_id)
    }
}
