//! The hub's task records (reference §9): one record per request relayed through the MUX or
//! the task scheduler, filled from the relayed traffic, kept by a backend (memory, SQLite or
//! none), and queried with mongo-style queries over the hub socket.
//!
//! On the message path the relays only copy the small packed dict parts and take shared
//! handles on large buffers; unpacking happens when a query needs a field.

mod bounded;
pub mod date;
mod hub;
mod memory;
pub mod query;
pub mod record;
mod sqlite;

use fp_io::RecvFrame;
use fp_wire::{Field, Packer, Value};

use crate::log::{log_at, Level};
use crate::server::Env;
use bounded::BoundedSet;
use date::Micros;
pub use query::{Query, QueryError};
pub use record::{Blob, TaskRecord, Update};

/// Default limits of the in-memory backend.
pub const DEFAULT_RECORD_LIMIT: usize = 20_000;
pub const DEFAULT_SIZE_LIMIT: usize = 1 << 30;

/// Where records are kept.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Add a record (merged into an existing one with the same msg_id).
    fn add(&mut self, rec: TaskRecord);
    /// Change a record (an empty one is created first if there is none).
    fn update(&mut self, msg_id: &str, u: Update);
    fn get(&mut self, msg_id: &str) -> Result<TaskRecord, QueryError>;
    /// Several records (one flush for backends that write in the background).
    fn get_many(&mut self, ids: &[String]) -> Vec<Result<TaskRecord, QueryError>> {
        ids.iter().map(|id| self.get(id)).collect()
    }
    /// Call `f` on every record matching `q`, oldest first.
    fn find(&mut self, q: &Query, f: &mut dyn FnMut(&TaskRecord)) -> Result<(), QueryError>;
    fn remove(&mut self, ids: &[String]);
    /// Every msg_id with its submission time, oldest first.
    fn history(&mut self) -> Result<Vec<(String, Option<i64>)>, QueryError>;
}

/// `--db none`: nothing is kept; reads are clear errors.
struct NoRecords;

fn disabled() -> QueryError {
    QueryError::key(
        "the controller keeps no task records (started with --db none); use --db memory or \
         --db sqlite",
    )
}

impl Backend for NoRecords {
    fn name(&self) -> &'static str {
        "none"
    }
    fn add(&mut self, _: TaskRecord) {}
    fn update(&mut self, _: &str, _: Update) {}
    fn get(&mut self, _: &str) -> Result<TaskRecord, QueryError> {
        Err(disabled())
    }
    fn find(&mut self, _: &Query, _: &mut dyn FnMut(&TaskRecord)) -> Result<(), QueryError> {
        Err(disabled())
    }
    fn remove(&mut self, _: &[String]) {}
    fn history(&mut self) -> Result<Vec<(String, Option<i64>)>, QueryError> {
        Err(disabled())
    }
}

/// The request parts copied off a relayed message.
#[derive(Clone)]
pub struct Captured {
    pub header: Vec<u8>,
    pub metadata: Vec<u8>,
    pub content: Vec<u8>,
    pub buffers: Vec<Blob>,
}

/// Settings of the records (from the controller config).
#[derive(Debug, Clone)]
pub struct RecordsConfig {
    pub db: String,
    pub path: Option<String>,
    pub restore: bool,
    pub record_limit: usize,
    pub size_limit: usize,
}

pub struct Records {
    backend: Box<dyn Backend>,
    pub packer: Packer,
    enabled: bool,
    /// Persistent backends: buffers are checked against their digest before they are stored
    /// (records outlive this run's key, so they could not be checked when served later).
    /// Without it (memory), the hub checks buffers when it serves them (`records::hub`).
    store_checks: Option<fp_io::SessionCore>,
    /// msg_ids purged lately: what still arrives for them (a late output, an assignment
    /// recorded after the reply) does not bring a bare record back, as in ipyparallel, whose
    /// hub updates only records that exist.
    purged: BoundedSet,
}

/// How many purged msg_ids are remembered.
const PURGED_MEMORY: usize = 1 << 16;

fn date_of(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_str).and_then(date::parse)
}

/// The `date` of a packed header. For msgpack the value is read straight from the bytes (a
/// header is a flat map of short strings, so the key `date` appears as the fixstr `\xa4date`);
/// anything unexpected falls back to unpacking the header.
fn header_date(packer: Packer, packed: &[u8]) -> Option<i64> {
    if packer == Packer::Msgpack {
        const KEY: &[u8] = b"\xa4date";
        if let Some(at) = packed.windows(KEY.len()).position(|w| w == KEY) {
            let rest = &packed[at + KEY.len()..];
            let s = match rest.first() {
                Some(&b) if (0xa0..=0xbf).contains(&b) => rest.get(1..1 + (b - 0xa0) as usize),
                Some(0xd9) => rest.get(1).and_then(|n| rest.get(2..2 + *n as usize)),
                _ => None,
            };
            if let Some(t) = s
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(date::parse)
            {
                return Some(t);
            }
        }
    }
    let header = packer.unpack(packed, "header").ok()?;
    date_of(header.get("date"))
}

impl Records {
    pub fn open(cfg: &RecordsConfig, packer: Packer) -> Result<Records, String> {
        let backend: Box<dyn Backend> = match cfg.db.as_str() {
            "memory" => Box::new(memory::Memory::new(
                cfg.record_limit,
                cfg.size_limit,
                packer,
            )),
            "none" => Box::new(NoRecords),
            "sqlite" => {
                let path = cfg.path.clone().unwrap_or_else(|| "tasks.db".into());
                Box::new(sqlite::Sqlite::open(&path, cfg.restore, packer)?)
            }
            other => return Err(format!("unknown db backend {other:?}")),
        };
        log_at!(Level::Info, "task records: {} backend", backend.name());
        Ok(Records {
            enabled: backend.name() != "none",
            backend,
            packer,
            store_checks: None,
            purged: BoundedSet::new(PURGED_MEMORY),
        })
    }

    /// Check buffers with `core` before storing them when the backend outlives the process
    /// (see [`Records::checked_when_stored`]).
    pub fn with_store_checks(mut self, core: fp_io::SessionCore) -> Records {
        if self.backend.name() == "sqlite" {
            self.store_checks = Some(core);
        }
        self
    }

    /// Drop the records of `ids`; later updates of them are ignored.
    pub fn remove(&mut self, ids: &[String]) {
        self.backend.remove(ids);
        for id in ids {
            self.purged.insert(id);
        }
    }

    /// Apply `u` to the record of `msg_id` (made if need be), unless it was purged.
    fn update(&mut self, msg_id: &str, u: Update) {
        if self.purged.is_empty() || !self.purged.contains(msg_id) {
            self.backend.update(msg_id, u);
        }
    }

    /// Whether stored buffers were checked against their digest when stored (otherwise the
    /// hub checks them before serving them).
    pub fn checked_when_stored(&self) -> bool {
        self.store_checks.is_some()
    }

    /// Buffers of a message to store: all of them, or none when a store check finds them
    /// altered (the record is kept, without them).
    fn storable(&self, metadata: &[u8], buffers: &[RecvFrame]) -> Vec<Blob> {
        if let Some(core) = &self.store_checks {
            if !buffers.is_empty() {
                let frames = buffers.iter().map(AsRef::as_ref);
                if let Err(e) = core.check_packed_buffers(Some(metadata), frames) {
                    log_at!(
                        Level::Warning,
                        "buffers not recorded: they do not match their digest ({e})"
                    );
                    return Vec::new();
                }
            }
        }
        buffers.iter().map(Blob::of).collect()
    }

    pub fn backend(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Copy the request parts of `env` (`None` when records are off).
    pub fn capture(&self, env: &Env) -> Option<Captured> {
        if !self.enabled {
            return None;
        }
        Some(Captured {
            header: env.header.as_ref().to_vec(),
            metadata: env.metadata.as_ref().to_vec(),
            content: env.content.as_ref().to_vec(),
            buffers: self.storable(env.metadata.as_ref(), &env.buffers),
        })
    }

    /// A request was relayed (`queue` is `mux` or `task`).
    pub fn on_request(
        &mut self,
        queue: &str,
        header: &Value,
        cap: Option<Captured>,
        engine: Option<&[u8]>,
    ) {
        if cap.is_none() {
            return;
        }
        let Some(msg_id) = header.get("msg_id").and_then(Value::as_str) else {
            return;
        };
        let session = header
            .get("session")
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.on_request_parts(
            queue,
            msg_id,
            date_of(header.get("date")),
            session,
            cap,
            engine,
        );
    }

    /// [`Records::on_request`] with the header fields it records read already: its
    /// `msg_id`, `date` (`submitted`) and `session` (`client_uuid`).
    pub fn on_request_parts(
        &mut self,
        queue: &str,
        msg_id: &str,
        submitted: Option<Micros>,
        client_uuid: Option<String>,
        cap: Option<Captured>,
        engine: Option<&[u8]>,
    ) {
        let Some(cap) = cap else {
            return;
        };
        let rec = TaskRecord {
            msg_id: msg_id.to_owned(),
            submitted,
            client_uuid,
            engine_uuid: engine.map(|e| String::from_utf8_lossy(e).into_owned()),
            queue: Some(queue.to_owned()),
            header: Some(cap.header),
            metadata: Some(cap.metadata),
            content: Some(cap.content),
            buffers: cap.buffers,
            ..TaskRecord::default()
        };
        if !self.purged.is_empty() {
            self.purged.remove(msg_id); // (a new request under that id: recorded again)
        }
        self.backend.add(rec);
    }

    /// A load-balanced task went to `engine`.
    pub fn on_assign(&mut self, msg_id: &str, engine: &[u8]) {
        if self.enabled {
            let e = String::from_utf8_lossy(engine).into_owned();
            self.update(msg_id, Update::Engine(e));
        }
    }

    /// An engine's reply to `msg_id` is being relayed.
    pub fn on_reply(&mut self, msg_id: &str, engine: &[u8], env: &Env) {
        if !self.enabled {
            return;
        }
        let completed = header_date(self.packer, env.header.as_ref());
        // (read in place: a reply's metadata is a dozen strings, unpacking it was most of
        // the cost of recording a reply)
        let [engine_field, started] = self
            .packer
            .fields(env.metadata.as_ref(), "metadata", ["engine", "started"])
            .unwrap_or_default();
        let now = date::now();
        let engine_uuid = engine_field
            .as_ref()
            .and_then(Field::as_str)
            .map(str::to_owned)
            .or_else(|| Some(String::from_utf8_lossy(engine).into_owned()));
        let u = Update::Reply {
            engine_uuid,
            started: started
                .as_ref()
                .and_then(Field::as_str)
                .and_then(date::parse),
            completed: completed.unwrap_or(now),
            received: now,
            header: env.header.as_ref().to_vec(),
            metadata: env.metadata.as_ref().to_vec(),
            content: env.content.as_ref().to_vec(),
            buffers: self.storable(env.metadata.as_ref(), &env.buffers),
        };
        self.update(msg_id, u);
    }

    /// The controller answered `msg_id` itself (scheduler error, dead engine, abort) with a
    /// message under `header`: recorded as that reply, as a peer's would be.
    pub fn on_controller_reply(
        &mut self,
        msg_id: &str,
        engine: Option<&[u8]>,
        header: &Value,
        metadata: &Value,
        content: &Value,
    ) {
        if !self.enabled {
            return;
        }
        let pack = |v: &Value| self.packer.pack(v).unwrap_or_default();
        let now = date::now();
        let u = Update::Reply {
            engine_uuid: engine.map(|e| String::from_utf8_lossy(e).into_owned()),
            started: None,
            completed: date_of(header.get("date")).unwrap_or(now),
            received: now,
            header: pack(header),
            metadata: pack(metadata),
            content: pack(content),
            buffers: Vec::new(),
        };
        self.update(msg_id, u);
    }

    /// An IOPub message: output of the request named by its parent header.
    pub fn on_iopub(&mut self, msg_type: &str, env: &Env) {
        if !self.enabled
            || !matches!(
                msg_type,
                "stream" | "error" | "execute_input" | "execute_result"
            )
        {
            return;
        }
        let Ok(parent) = self
            .packer
            .unpack(env.parent_header.as_ref(), "parent_header")
        else {
            return;
        };
        let Some(msg_id) = parent.get("msg_id").and_then(Value::as_str) else {
            return;
        };
        let u = match msg_type {
            "stream" => {
                let Ok(c) = self.packer.unpack(env.content.as_ref(), "content") else {
                    return;
                };
                let text = c
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                match c.get("name").and_then(Value::as_str) {
                    Some("stderr") => Update::Stderr(text),
                    _ => Update::Stdout(text),
                }
            }
            "execute_input" => {
                let Ok(c) = self.packer.unpack(env.content.as_ref(), "content") else {
                    return;
                };
                let code = c
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                Update::ExecuteInput(code)
            }
            "execute_result" => Update::ExecuteResult(env.content.as_ref().to_vec()),
            _ => Update::Error(env.content.as_ref().to_vec()),
        };
        self.update(msg_id, u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp_io::RecvFrame;
    use fp_wire::{Envelope, Parts};

    fn env(p: Packer, header: &Value, md: &Value, bufs: &[usize]) -> Env {
        let f = |v: &Value| RecvFrame::from_bytes(&p.pack(v).unwrap());
        Envelope {
            idents: vec![RecvFrame::from_bytes(b"client")],
            signature: RecvFrame::from_bytes(&[b'0'; 64]),
            header: f(header),
            parent_header: f(header),
            metadata: f(md),
            content: f(&Value::empty_map()),
            buffers: bufs
                .iter()
                .map(|n| RecvFrame::from_bytes(&vec![7u8; *n]))
                .collect(),
        }
    }

    fn open_records(db: &str, path: &std::path::Path, p: Packer) -> Records {
        let cfg = RecordsConfig {
            db: db.into(),
            path: Some(path.to_string_lossy().into_owned()),
            restore: false,
            record_limit: DEFAULT_RECORD_LIMIT,
            size_limit: DEFAULT_SIZE_LIMIT,
        };
        Records::open(&cfg, p).unwrap()
    }

    fn core(p: Packer) -> fp_io::SessionCore {
        fp_io::SessionCore::new(
            b"key".to_vec(),
            p,
            "hmac-sha256",
            "s".into(),
            "u".into(),
            1,
            fp_wire::Limits::default(),
        )
        .unwrap()
    }

    /// `check(backend name, records)` with both storing backends (on a fresh database file).
    fn with_each_backend(tag: &str, check: impl Fn(&str, Records)) {
        let path = std::env::temp_dir().join(format!("fp-{tag}-{}.db", std::process::id()));
        for db in ["memory", "sqlite"] {
            let _ = std::fs::remove_file(&path);
            check(db, open_records(db, &path, Packer::Msgpack));
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_purged_record_does_not_come_back_with_a_late_update() {
        let p = Packer::Msgpack;
        with_each_backend("purged", |db, mut r| {
            let h = Value::map([("msg_id", Value::from("t")), ("msg_type", Value::from("x"))]);
            let e = env(p, &h, &Value::empty_map(), &[]);
            let cap = r.capture(&e);
            r.on_request("task", &h, cap, None);
            r.on_assign("t", b"engine-1");
            assert!(r.backend().get("t").is_ok(), "{db}");
            r.remove(&["t".to_owned()]);
            // what still arrives for it: an assignment, output
            r.on_assign("t", b"engine-2");
            let out = Value::map([("name", Value::from("stdout")), ("text", Value::from("x"))]);
            let mut late = env(p, &h, &Value::empty_map(), &[]);
            late.content = RecvFrame::from_bytes(&p.pack(&out).unwrap());
            r.on_iopub("stream", &late);
            assert!(
                r.backend().get("t").is_err(),
                "{db}: the purged record came back"
            );
            // a new request under that id is recorded again
            let cap = r.capture(&e);
            r.on_request("task", &h, cap, None);
            r.on_assign("t", b"engine-3");
            assert_eq!(
                r.backend().get("t").unwrap().engine_uuid.as_deref(),
                Some("engine-3")
            );
        });
    }

    #[test]
    fn persistent_records_keep_only_buffers_that_match_their_digest() {
        let p = Packer::Msgpack;
        let path = std::env::temp_dir().join(format!("fp-store-check-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        for db in ["memory", "sqlite"] {
            let r = open_records(db, &path, p).with_store_checks(core(p));
            assert_eq!(r.checked_when_stored(), db == "sqlite");
            let h = Value::map([("msg_id", Value::from("a")), ("msg_type", Value::from("x"))]);
            // a digest of two buffers (3 and 4 bytes of 7s)
            let mut parts = Parts {
                header: h.clone(),
                parent_header: Value::empty_map(),
                metadata: Value::empty_map(),
                content: Value::empty_map(),
            };
            core(p).add_buffers_digest(&mut parts, [&[7u8; 3][..], &[7u8; 4][..]]);
            let genuine = env(p, &h, &parts.metadata, &[3, 4]);
            assert_eq!(r.capture(&genuine).unwrap().buffers.len(), 2);
            let swapped = env(p, &h, &parts.metadata, &[4, 3]);
            let kept = r.capture(&swapped).unwrap().buffers.len();
            assert_eq!(kept, if db == "sqlite" { 0 } else { 2 }, "{db}");
            let no_digest = env(p, &h, &Value::empty_map(), &[5]);
            assert_eq!(r.capture(&no_digest).unwrap().buffers.len(), 1);
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn header_date_fast_path() {
        for p in [Packer::Msgpack, Packer::Json] {
            let h = Value::map([
                ("msg_id", Value::from("a")),
                ("date", Value::from("1970-01-01T00:00:01Z")),
                ("session", Value::from("s")),
            ]);
            assert_eq!(header_date(p, &p.pack(&h).unwrap()), Some(1_000_000));
            let none = Value::map([("msg_id", Value::from("a"))]);
            assert_eq!(header_date(p, &p.pack(&none).unwrap()), None);
            let odd = Value::map([("date", Value::Int(3))]);
            assert_eq!(header_date(p, &p.pack(&odd).unwrap()), None);
        }
        assert_eq!(header_date(Packer::Msgpack, b"\xa4date\xbf"), None);
        assert_eq!(header_date(Packer::Msgpack, b""), None);
    }

    /// Per-task cost of the relay hooks (request, assignment, reply) on each backend:
    /// `cargo test --release -p fp-controller hook_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hook_cost() {
        let p = Packer::Msgpack;
        let n = 200_000;
        for db in ["none", "memory", "sqlite"] {
            let path = std::env::temp_dir().join(format!("fp-hook-cost-{}.db", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let mut r = open_records(db, &path, p);
            let md = Value::map([("after", Value::Array(vec![])), ("retries", Value::Int(0))]);
            let reply_md = Value::map([
                ("started", Value::from("2026-11-26T23:00:00.000001Z")),
                ("engine", Value::from("e0")),
                ("status", Value::from("ok")),
            ]);
            let mut hooks = std::time::Duration::ZERO;
            let mut parts = [std::time::Duration::ZERO; 4];
            for i in 0..n {
                let h = Value::map([
                    ("msg_id", Value::Str(format!("s_1_{i}"))),
                    ("msg_type", Value::from("apply_request")),
                    ("session", Value::from("s")),
                    ("date", Value::from("2026-11-26T23:00:00.000000Z")),
                ]);
                let req = env(p, &h, &md, &[12, 515, 20]);
                let rep = env(p, &h, &reply_md, &[5]);
                let id = format!("s_1_{i}");
                let t = std::time::Instant::now();
                let cap = r.capture(&req);
                parts[0] += t.elapsed();
                let t1 = std::time::Instant::now();
                r.on_request("task", &h, cap, None);
                parts[1] += t1.elapsed();
                let t2 = std::time::Instant::now();
                r.on_assign(&id, b"e0");
                parts[2] += t2.elapsed();
                let t3 = std::time::Instant::now();
                r.on_reply(&id, b"e0", &rep);
                parts[3] += t3.elapsed();
                hooks += t.elapsed();
                drop((req, rep));
            }
            let per = hooks.as_nanos() as f64 / n as f64;
            let parts: Vec<u128> = parts.iter().map(|d| d.as_nanos() / n as u128).collect();
            println!("{db}: capture/request/assign/reply ns {parts:?}");
            let t2 = std::time::Instant::now();
            let q = Query::parse(&Value::map([(
                "completed",
                Value::map([("$gt", Value::from("2026-01-01"))]),
            )]))
            .unwrap();
            let mut hits = 0;
            if db != "none" {
                r.backend().find(&q, &mut |_| hits += 1).unwrap();
            }
            let scan = t2.elapsed();
            println!(
                "{db:7} hooks {per:7.0} ns/task (event loop); find over {hits} records {:.1} ms",
                scan.as_secs_f64() * 1e3
            );
            drop(r);
            let _ = std::fs::remove_file(&path);
        }
    }
}
