//! The SQLite backend: one file, written by a writer thread in transactions every ~50 ms (the
//! event loop only queues operations), read by the event loop after a flush. With `restore`
//! the records of earlier runs are kept.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fp_wire::{Packer, Value};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::query::{Cond, Operand, Query, QueryError};
use super::record::{Blob, TaskRecord, Update};
use super::Backend;
use crate::log::{log_at, Level};

const BATCH: Duration = Duration::from_millis(50);
const FLUSH_WAIT: Duration = Duration::from_secs(30);

const COLUMNS: &str = "msg_id, header, metadata, content, buffers, submitted, client_uuid, \
    engine_uuid, started, completed, resubmitted, received, result_header, result_metadata, \
    result_content, result_buffers, queue, execute_input, execute_result, error, stdout, stderr, \
    label";

enum Op {
    Add(Box<TaskRecord>),
    Update(String, Box<Update>),
    Remove(Vec<String>),
    Flush(Sender<Result<(), String>>),
}

pub struct Sqlite {
    tx: Option<Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    reader: Connection,
    packer: Packer,
    /// The packer the stored dict parts were written with (differs after a restore with
    /// another packer).
    stored_packer: Packer,
}

fn sql_err(e: rusqlite::Error) -> String {
    e.to_string()
}

fn pack_blobs(blobs: &[Blob]) -> Option<Vec<u8>> {
    if blobs.is_empty() {
        return None;
    }
    let total: usize = blobs.iter().map(|b| b.len() + 8).sum();
    let mut out = Vec::with_capacity(total + 4);
    out.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    for b in blobs {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b.as_ref());
    }
    Some(out)
}

fn unpack_blobs(data: Option<Vec<u8>>) -> Vec<Blob> {
    let Some(data) = data else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Some(n) = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
    else {
        return out;
    };
    let mut at = 4usize;
    for _ in 0..n {
        let Some(len) = data
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            break;
        };
        at += 8;
        let end = at.saturating_add(len as usize);
        let Some(bytes) = data.get(at..end) else {
            break;
        };
        out.push(Blob::Owned(bytes.to_vec()));
        at = end;
    }
    out
}

fn open(path: &str) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err)?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        .map_err(sql_err)?;
    Ok(conn)
}

fn create(conn: &Connection, restore: bool, packer: Packer) -> Result<Packer, String> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS fp_meta (key TEXT PRIMARY KEY, value TEXT);
         CREATE TABLE IF NOT EXISTS fp_tasks (
            seq INTEGER NOT NULL,
            msg_id TEXT PRIMARY KEY, header BLOB, metadata BLOB, content BLOB, buffers BLOB,
            submitted INTEGER, client_uuid TEXT, engine_uuid TEXT, started INTEGER,
            completed INTEGER, resubmitted TEXT, received INTEGER, result_header BLOB,
            result_metadata BLOB, result_content BLOB, result_buffers BLOB, queue TEXT,
            execute_input TEXT, execute_result BLOB, error BLOB, stdout TEXT NOT NULL DEFAULT '',
            stderr TEXT NOT NULL DEFAULT '', label TEXT);
         CREATE INDEX IF NOT EXISTS fp_tasks_seq ON fp_tasks(seq);",
    )
    .map_err(sql_err)?;
    let stored: Option<String> = conn
        .query_row("SELECT value FROM fp_meta WHERE key = 'packer'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql_err)?;
    if !restore {
        conn.execute("DELETE FROM fp_tasks", []).map_err(sql_err)?;
    }
    let stored = match (restore, stored) {
        (true, Some(name)) => Packer::from_name(&name).unwrap_or(packer),
        _ => {
            conn.execute(
                "INSERT OR REPLACE INTO fp_meta (key, value) VALUES ('packer', ?1)",
                [packer.name()],
            )
            .map_err(sql_err)?;
            packer
        }
    };
    Ok(stored)
}

impl Sqlite {
    pub fn open(path: &str, restore: bool, packer: Packer) -> Result<Sqlite, String> {
        let writer_conn = open(path)?;
        let stored_packer = create(&writer_conn, restore, packer)?;
        let reader = open(path)?;
        let kept: i64 = reader
            .query_row("SELECT COUNT(*) FROM fp_tasks", [], |r| r.get(0))
            .map_err(sql_err)?;
        if restore {
            log_at!(Level::Info, "task records: {kept} restored from {path}");
        }
        let (tx, rx) = channel();
        let writer = std::thread::Builder::new()
            .name("ferroparallel-records".into())
            .spawn(move || write_loop(writer_conn, rx, packer, stored_packer))
            .map_err(|e| format!("cannot start the records writer: {e}"))?;
        Ok(Sqlite {
            tx: Some(tx),
            writer: Some(writer),
            reader,
            packer,
            stored_packer,
        })
    }

    fn send(&self, op: Op) {
        if let Some(tx) = &self.tx {
            if tx.send(op).is_err() {
                log_at!(
                    Level::Error,
                    "the task records writer stopped; records are lost"
                );
            }
        }
    }

    fn flush(&self) -> Result<(), QueryError> {
        let (tx, rx) = channel();
        self.send(Op::Flush(tx));
        match rx.recv_timeout(FLUSH_WAIT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueryError::runtime(format!("task records database: {e}"))),
            Err(_) => Err(QueryError::runtime(
                "the task records writer did not answer (database busy or stopped)",
            )),
        }
    }

    fn repack(&self, data: Option<Vec<u8>>, part: &'static str) -> Option<Vec<u8>> {
        if self.stored_packer == self.packer {
            return data;
        }
        let v = self.stored_packer.unpack(&data?, part).ok()?;
        self.packer.pack(&v).ok()
    }

    fn record_of(&self, row: &Row<'_>) -> rusqlite::Result<TaskRecord> {
        Ok(TaskRecord {
            msg_id: row.get(0)?,
            header: self.repack(row.get(1)?, "header"),
            metadata: self.repack(row.get(2)?, "metadata"),
            content: self.repack(row.get(3)?, "content"),
            buffers: unpack_blobs(row.get(4)?),
            submitted: row.get(5)?,
            client_uuid: row.get(6)?,
            engine_uuid: row.get(7)?,
            started: row.get(8)?,
            completed: row.get(9)?,
            resubmitted: row.get(10)?,
            received: row.get(11)?,
            result_header: self.repack(row.get(12)?, "header"),
            result_metadata: self.repack(row.get(13)?, "metadata"),
            result_content: self.repack(row.get(14)?, "content"),
            result_buffers: unpack_blobs(row.get(15)?),
            queue: row.get(16)?,
            execute_input: row.get(17)?,
            execute_result: self.repack(row.get(18)?, "content"),
            error: self.repack(row.get(19)?, "content"),
            stdout: row.get(20)?,
            stderr: row.get(21)?,
            label: row.get(22)?,
        })
    }

    /// One record, without flushing the writer first.
    fn read_one(&self, msg_id: &str) -> Result<TaskRecord, QueryError> {
        let sql = format!("SELECT {COLUMNS} FROM fp_tasks WHERE msg_id = ?1");
        let mut stmt = self.reader.prepare_cached(&sql).map_err(Self::db_err)?;
        let rec = stmt
            .query_row([msg_id], |r| self.record_of(r))
            .optional()
            .map_err(Self::db_err)?;
        rec.ok_or_else(|| QueryError::key(format!("no task record {msg_id:?}")))
    }

    fn db_err(e: rusqlite::Error) -> QueryError {
        QueryError::runtime(format!("task records database: {e}"))
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn add(&mut self, rec: TaskRecord) {
        self.send(Op::Add(Box::new(rec)));
    }

    fn update(&mut self, msg_id: &str, u: Update) {
        self.send(Op::Update(msg_id.to_owned(), Box::new(u)));
    }

    fn get(&mut self, msg_id: &str) -> Result<TaskRecord, QueryError> {
        self.flush()?;
        self.read_one(msg_id)
    }

    fn get_many(&mut self, ids: &[String]) -> Vec<Result<TaskRecord, QueryError>> {
        if let Err(e) = self.flush() {
            return ids.iter().map(|_| Err(e.clone())).collect();
        }
        ids.iter().map(|id| self.read_one(id)).collect()
    }

    fn find(&mut self, q: &Query, f: &mut dyn FnMut(&TaskRecord)) -> Result<(), QueryError> {
        self.flush()?;
        if let Some(ids) = q.msg_ids() {
            for id in ids {
                match self.read_one(&id) {
                    Ok(r) if q.matches(&r, self.packer) => f(&r),
                    Ok(_) => {}
                    Err(e) if e.ename == "KeyError" => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        let mut args = Vec::new();
        let mut clauses = Vec::new();
        prefilter(q, &mut clauses, &mut args);
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let sql = format!("SELECT {COLUMNS} FROM fp_tasks {filter} ORDER BY seq");
        let mut stmt = self.reader.prepare_cached(&sql).map_err(Self::db_err)?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(args.iter()))
            .map_err(Self::db_err)?;
        while let Some(row) = rows.next().map_err(Self::db_err)? {
            let r = self.record_of(row).map_err(Self::db_err)?;
            if q.matches(&r, self.packer) {
                f(&r);
            }
        }
        Ok(())
    }

    fn remove(&mut self, ids: &[String]) {
        self.send(Op::Remove(ids.to_vec()));
    }

    fn history(&mut self) -> Result<Vec<(String, Option<i64>)>, QueryError> {
        self.flush()?;
        let mut stmt = self
            .reader
            .prepare_cached("SELECT msg_id, submitted FROM fp_tasks ORDER BY seq")
            .map_err(Self::db_err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Self::db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(Self::db_err)
    }
}

// ----- SQL prefilter ----------------------------------------------------------------------

const DATE_COLUMNS: [&str; 4] = ["submitted", "started", "completed", "received"];
const TEXT_COLUMNS: [&str; 6] = [
    "msg_id",
    "client_uuid",
    "engine_uuid",
    "resubmitted",
    "queue",
    "label",
];

/// A plain string operand that is not a date (dates may match other spellings).
fn text(o: &Operand) -> Option<String> {
    match (&o.value, o.date) {
        (Value::Str(s), None) => Some(s.clone()),
        _ => None,
    }
}

/// SQL conditions implied by `q` on the indexed scalar columns, so SQLite skips rows that
/// cannot match. Rows it returns are still checked by [`Query::matches`]: a condition is only
/// translated when every row it excludes would fail the query.
fn prefilter(q: &Query, clauses: &mut Vec<String>, args: &mut Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as Sql;
    match q {
        Query::And(qs) => qs.iter().for_each(|q| prefilter(q, clauses, args)),
        Query::Or(_) => {}
        Query::Fields(fields) => {
            for (name, conds) in fields {
                let date_col = DATE_COLUMNS.contains(&name.as_str());
                let text_col = TEXT_COLUMNS.contains(&name.as_str());
                if !date_col && !text_col {
                    continue;
                }
                for c in conds {
                    let mut cmp = |op: &str, v: Sql| {
                        args.push(v);
                        clauses.push(format!("{name} {op} ?{}", args.len()));
                    };
                    match c {
                        Cond::Eq(o) if o.value.is_nil() => clauses.push(format!("{name} IS NULL")),
                        Cond::Ne(o) if o.value.is_nil() => {
                            clauses.push(format!("{name} IS NOT NULL"))
                        }
                        Cond::Exists(true) => clauses.push(format!("{name} IS NOT NULL")),
                        Cond::Exists(false) => clauses.push(format!("{name} IS NULL")),
                        Cond::Eq(o) if date_col => match o.date {
                            Some(t) => cmp("=", Sql::Integer(t)),
                            None => clauses.push("0".into()),
                        },
                        Cond::Lt(o) | Cond::Lte(o) | Cond::Gt(o) | Cond::Gte(o) if date_col => {
                            let op = match c {
                                Cond::Lt(_) => "<",
                                Cond::Lte(_) => "<=",
                                Cond::Gt(_) => ">",
                                _ => ">=",
                            };
                            match o.date {
                                Some(t) => cmp(op, Sql::Integer(t)),
                                None => clauses.push("0".into()),
                            }
                        }
                        Cond::Eq(o) if text_col => {
                            if let Some(s) = text(o) {
                                cmp("=", Sql::Text(s));
                            }
                        }
                        Cond::In(list) if text_col && !list.is_empty() => {
                            let texts: Option<Vec<String>> = list.iter().map(text).collect();
                            if let Some(texts) = texts {
                                let mut marks = Vec::new();
                                for t in texts {
                                    args.push(Sql::Text(t));
                                    marks.push(format!("?{}", args.len()));
                                }
                                clauses.push(format!("{name} IN ({})", marks.join(", ")));
                            }
                        }
                        Cond::Glob(p) if text_col && !p.contains(&'[') => {
                            cmp("GLOB", Sql::Text(p.iter().collect()));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

// ----- the writer thread ----------------------------------------------------------------------

struct Writer {
    conn: Connection,
    seq: i64,
    packer: Packer,
    stored: Packer,
    /// Records added during the current batch, updated in memory and written once at the
    /// end of the batch (most tasks start and finish within one batch: one row write each).
    batch: HashMap<String, TaskRecord>,
    batch_order: Vec<String>,
}

impl Writer {
    /// Dict parts are stored with the packer the file was created with.
    fn conv(&self, data: Option<Vec<u8>>, part: &'static str) -> Option<Vec<u8>> {
        if self.packer == self.stored {
            return data;
        }
        let v = self.packer.unpack(&data?, part).ok()?;
        self.stored.pack(&v).ok()
    }

    fn label_of(&self, r: &TaskRecord) -> Option<String> {
        if r.label.is_some() {
            return r.label.clone();
        }
        let md = self
            .packer
            .unpack(r.metadata.as_deref()?, "metadata")
            .ok()?;
        match md.get("label") {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Write a record; merged into an existing row (its values win where present; streams
    /// are appended).
    fn upsert(&mut self, r: TaskRecord) -> rusqlite::Result<()> {
        self.seq += 1;
        let label = self.label_of(&r);
        let sql = "INSERT INTO fp_tasks (seq, msg_id, header, metadata, content, buffers, \
            submitted, client_uuid, engine_uuid, started, completed, resubmitted, received, \
            result_header, result_metadata, result_content, result_buffers, queue, \
            execute_input, execute_result, error, stdout, stderr, label) VALUES (?1, ?2, ?3, \
            ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, \
            ?22, ?23, ?24) ON CONFLICT(msg_id) DO UPDATE SET \
            header = coalesce(excluded.header, header), \
            metadata = coalesce(excluded.metadata, metadata), \
            content = coalesce(excluded.content, content), \
            buffers = coalesce(excluded.buffers, buffers), \
            submitted = coalesce(excluded.submitted, submitted), \
            client_uuid = coalesce(excluded.client_uuid, client_uuid), \
            engine_uuid = coalesce(excluded.engine_uuid, engine_uuid), \
            started = coalesce(excluded.started, started), \
            completed = coalesce(excluded.completed, completed), \
            resubmitted = coalesce(excluded.resubmitted, resubmitted), \
            received = coalesce(excluded.received, received), \
            result_header = coalesce(excluded.result_header, result_header), \
            result_metadata = coalesce(excluded.result_metadata, result_metadata), \
            result_content = coalesce(excluded.result_content, result_content), \
            result_buffers = coalesce(excluded.result_buffers, result_buffers), \
            queue = coalesce(excluded.queue, queue), \
            execute_input = coalesce(excluded.execute_input, execute_input), \
            execute_result = coalesce(excluded.execute_result, execute_result), \
            error = coalesce(excluded.error, error), \
            label = coalesce(excluded.label, label), \
            stdout = stdout || excluded.stdout, stderr = stderr || excluded.stderr";
        let mut stmt = self.conn.prepare_cached(sql)?;
        stmt.execute(params![
            self.seq,
            r.msg_id,
            self.conv(r.header.clone(), "header"),
            self.conv(r.metadata.clone(), "metadata"),
            self.conv(r.content.clone(), "content"),
            pack_blobs(&r.buffers),
            r.submitted,
            r.client_uuid,
            r.engine_uuid,
            r.started,
            r.completed,
            r.resubmitted,
            r.received,
            self.conv(r.result_header.clone(), "header"),
            self.conv(r.result_metadata.clone(), "metadata"),
            self.conv(r.result_content.clone(), "content"),
            pack_blobs(&r.result_buffers),
            r.queue,
            r.execute_input,
            self.conv(r.execute_result.clone(), "content"),
            self.conv(r.error.clone(), "content"),
            r.stdout,
            r.stderr,
            label,
        ])?;
        Ok(())
    }

    fn update_once(&mut self, id: &str, u: &Update) -> rusqlite::Result<usize> {
        let c = &self.conn;
        match u {
            Update::Engine(e) => c
                .prepare_cached("UPDATE fp_tasks SET engine_uuid = ?2 WHERE msg_id = ?1")?
                .execute(params![id, e]),
            Update::Reply {
                engine_uuid,
                started,
                completed,
                received,
                header,
                metadata,
                content,
                buffers,
            } => c
                .prepare_cached(
                    "UPDATE fp_tasks SET engine_uuid = coalesce(?2, engine_uuid), \
                     started = coalesce(?3, started), completed = ?4, received = ?5, \
                     result_header = ?6, result_metadata = ?7, result_content = ?8, \
                     result_buffers = ?9 WHERE msg_id = ?1",
                )?
                .execute(params![
                    id,
                    engine_uuid,
                    started,
                    completed,
                    received,
                    self.conv(Some(header.clone()), "header"),
                    self.conv(Some(metadata.clone()), "metadata"),
                    self.conv(Some(content.clone()), "content"),
                    pack_blobs(buffers),
                ]),
            Update::Stdout(t) => c
                .prepare_cached("UPDATE fp_tasks SET stdout = stdout || ?2 WHERE msg_id = ?1")?
                .execute(params![id, t]),
            Update::Stderr(t) => c
                .prepare_cached("UPDATE fp_tasks SET stderr = stderr || ?2 WHERE msg_id = ?1")?
                .execute(params![id, t]),
            Update::ExecuteInput(t) => c
                .prepare_cached("UPDATE fp_tasks SET execute_input = ?2 WHERE msg_id = ?1")?
                .execute(params![id, t]),
            Update::ExecuteResult(b) => c
                .prepare_cached("UPDATE fp_tasks SET execute_result = ?2 WHERE msg_id = ?1")?
                .execute(params![id, self.conv(Some(b.clone()), "content")]),
            Update::Error(b) => c
                .prepare_cached("UPDATE fp_tasks SET error = ?2 WHERE msg_id = ?1")?
                .execute(params![id, self.conv(Some(b.clone()), "content")]),
            Update::Resubmitted(n) => c
                .prepare_cached("UPDATE fp_tasks SET resubmitted = ?2 WHERE msg_id = ?1")?
                .execute(params![id, n]),
        }
    }

    fn update(&mut self, id: &str, u: Update) -> rusqlite::Result<()> {
        if let Some(r) = self.batch.get_mut(id) {
            u.apply(r);
            return Ok(());
        }
        if self.update_once(id, &u)? == 0 {
            self.upsert(TaskRecord::new(id.to_owned()))?;
            self.update_once(id, &u)?;
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> rusqlite::Result<()> {
        match op {
            Op::Add(r) => {
                if let Some(old) = self.batch.get_mut(&r.msg_id) {
                    old.merge_from(*r);
                } else {
                    self.batch_order.push(r.msg_id.clone());
                    self.batch.insert(r.msg_id.clone(), *r);
                }
                Ok(())
            }
            Op::Update(id, u) => self.update(&id, *u),
            Op::Remove(ids) => {
                let mut stmt = self
                    .conn
                    .prepare_cached("DELETE FROM fp_tasks WHERE msg_id = ?1")?;
                for id in ids {
                    self.batch.remove(&id);
                    stmt.execute([id])?;
                }
                Ok(())
            }
            Op::Flush(_) => Ok(()),
        }
    }

    /// Write the records added during this batch.
    fn write_batch(&mut self) -> rusqlite::Result<()> {
        let order = std::mem::take(&mut self.batch_order);
        for id in order {
            if let Some(r) = self.batch.remove(&id) {
                self.upsert(r)?;
            }
        }
        self.batch.clear();
        Ok(())
    }
}

fn write_loop(conn: Connection, rx: Receiver<Op>, packer: Packer, stored: Packer) {
    let seq: i64 = conn
        .query_row("SELECT coalesce(max(seq), 0) FROM fp_tasks", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
    let mut w = Writer {
        conn,
        seq,
        packer,
        stored,
        batch: HashMap::new(),
        batch_order: Vec::new(),
    };
    let mut last_error: Option<String> = None;
    loop {
        let first = match rx.recv() {
            Ok(op) => op,
            Err(_) => return,
        };
        if let Err(e) = w.conn.execute_batch("BEGIN") {
            log_at!(
                Level::Error,
                "task records: cannot begin a transaction: {e}"
            );
        }
        let deadline = Instant::now() + BATCH;
        let mut waiters = Vec::new();
        let mut next = Some(first);
        let mut closed = false;
        while let Some(op) = next.take() {
            if let Op::Flush(tx) = op {
                waiters.push(tx);
                // a flush ends the batch now
                break;
            }
            if let Err(e) = w.apply(op) {
                log_at!(Level::Error, "task records: write failed: {e}");
                last_error = Some(e.to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            next = match rx.recv_timeout(left) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            };
        }
        if let Err(e) = w.write_batch() {
            log_at!(Level::Error, "task records: write failed: {e}");
            last_error = Some(e.to_string());
        }
        let result = w.conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if let Err(e) = &result {
            log_at!(Level::Error, "task records: commit failed: {e}");
        }
        for tx in waiters {
            let r = match (&result, last_error.take()) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), Some(e)) => Err(e),
                (Ok(()), None) => Ok(()),
            };
            let _ = tx.send(r);
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::query::Query;

    fn path(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("fp-records-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir.to_string_lossy().into_owned()
    }

    fn all(db: &mut Sqlite) -> Vec<TaskRecord> {
        let mut out = Vec::new();
        db.find(&Query::parse(&Value::Nil).unwrap(), &mut |r| {
            out.push(r.clone())
        })
        .unwrap();
        out
    }

    #[test]
    fn writes_updates_and_restore() {
        let p = path("a.db");
        let packer = Packer::Msgpack;
        {
            let mut db = Sqlite::open(&p, false, packer).unwrap();
            db.update("m1", Update::Stdout("early ".into()));
            let md = packer
                .pack(&Value::map([("label", Value::from("L"))]))
                .unwrap();
            db.add(TaskRecord {
                msg_id: "m1".into(),
                submitted: Some(5),
                metadata: Some(md),
                buffers: vec![Blob::Owned(b"abc".to_vec()), Blob::Owned(Vec::new())],
                ..TaskRecord::default()
            });
            db.update("m1", Update::Stdout("late".into()));
            db.update(
                "m1",
                Update::Reply {
                    engine_uuid: Some("e".into()),
                    started: Some(6),
                    completed: 7,
                    received: 8,
                    header: vec![0x80],
                    metadata: vec![0x80],
                    content: vec![0x80],
                    buffers: vec![Blob::Owned(b"result".to_vec())],
                },
            );
            db.add(TaskRecord {
                msg_id: "m2".into(),
                submitted: Some(9),
                ..TaskRecord::default()
            });
            let recs = all(&mut db);
            assert_eq!(recs.len(), 2);
            let r = db.get("m1").unwrap();
            assert_eq!(r.stdout, "early late");
            assert_eq!(r.label.as_deref(), Some("L"));
            assert_eq!(r.completed, Some(7));
            assert_eq!(r.buffers.len(), 2);
            assert_eq!(r.buffers[0].as_ref(), b"abc");
            assert_eq!(r.result_buffers[0].as_ref(), b"result");
            let ids = |db: &mut Sqlite, q: Value| {
                let mut out = Vec::new();
                db.find(&Query::parse(&q).unwrap(), &mut |r| {
                    out.push(r.msg_id.clone())
                })
                .unwrap();
                out
            };
            let op = |f: &str, o: &str, v: Value| Value::map([(f, Value::map([(o, v)]))]);
            let t = |s: &str| Value::from(s);
            assert_eq!(
                ids(&mut db, op("completed", "$gt", t("1970-01-01"))),
                ["m1"]
            );
            assert_eq!(
                ids(&mut db, op("completed", "$gt", Value::Int(3))),
                Vec::<String>::new()
            );
            assert_eq!(
                ids(&mut db, Value::map([("completed", Value::Nil)])),
                ["m2"]
            );
            assert_eq!(
                ids(
                    &mut db,
                    op("submitted", "$lte", t("1970-01-01T00:00:00.000005Z"))
                ),
                ["m1"]
            );
            assert_eq!(
                ids(
                    &mut db,
                    op("msg_id", "$in", Value::Array(vec![t("m2"), t("x")]))
                ),
                ["m2"]
            );
            assert_eq!(ids(&mut db, op("msg_id", "$glob", t("m*"))).len(), 2);
            assert_eq!(ids(&mut db, op("msg_id", "$glob", t("m[!1]"))), ["m2"]);
            assert_eq!(ids(&mut db, Value::map([("label", t("L"))])), ["m1"]);
            assert_eq!(
                ids(&mut db, op("engine_uuid", "$exists", Value::Bool(false))),
                ["m2"]
            );
            db.remove(&["m2".to_owned()]);
            assert_eq!(db.history().unwrap().len(), 1);
            assert_eq!(db.get("m2").unwrap_err().ename, "KeyError");
        }
        {
            let mut db = Sqlite::open(&p, true, packer).unwrap();
            assert_eq!(db.get("m1").unwrap().stdout, "early late");
            db.add(TaskRecord::new("m3".into()));
            let h = db.history().unwrap();
            assert_eq!(
                h.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
                ["m1", "m3"]
            );
        }
        {
            let mut db = Sqlite::open(&p, false, packer).unwrap();
            assert!(all(&mut db).is_empty());
        }
        let _ = std::fs::remove_file(&p);
    }
}
