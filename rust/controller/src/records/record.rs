//! One task record (reference §9.1) and its conversion to the `Value`s queries see.

use fp_io::{OutFrame, RecvFrame};
use fp_wire::{Packer, Value};

use super::date::{self, Micros};

/// Received buffers at least this long are kept as shared libzmq frames (a reference count, no
/// copy). Smaller ones are copied: a small received frame may live inside libzmq's 8 KiB receive
/// batch, and holding it would pin the whole batch.
pub const SHARE_MIN: usize = 8 * 1024;

/// A stored buffer: a shared received frame or owned bytes.
pub enum Blob {
    Shared(RecvFrame),
    Owned(Vec<u8>),
}

impl Blob {
    pub fn of(frame: &RecvFrame) -> Blob {
        let bytes = frame.as_ref();
        if bytes.len() >= SHARE_MIN {
            Blob::Shared(frame.share())
        } else {
            Blob::Owned(bytes.to_vec())
        }
    }

    /// A frame to send (shared or copied, never re-encoded).
    pub fn out_frame(&self) -> OutFrame {
        match self {
            Blob::Shared(f) => OutFrame::Received(f.share()),
            Blob::Owned(v) => OutFrame::Owned(v.clone()),
        }
    }

    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for Blob {
    fn clone(&self) -> Blob {
        match self {
            Blob::Shared(f) => Blob::Shared(f.share()),
            Blob::Owned(v) => Blob::Owned(v.clone()),
        }
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        match self {
            Blob::Shared(f) => f.as_ref(),
            Blob::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len())
    }
}

/// Every field of a record, in the order replies list them.
pub const FIELDS: [&str; 23] = [
    "msg_id",
    "header",
    "metadata",
    "content",
    "buffers",
    "submitted",
    "client_uuid",
    "engine_uuid",
    "started",
    "completed",
    "resubmitted",
    "received",
    "result_header",
    "result_metadata",
    "result_content",
    "result_buffers",
    "queue",
    "execute_input",
    "execute_result",
    "error",
    "stdout",
    "stderr",
    "label",
];

/// Fields holding dates.
pub const DATE_FIELDS: [&str; 4] = ["submitted", "started", "completed", "received"];

pub fn is_field(name: &str) -> bool {
    FIELDS.contains(&name)
}

/// A task record. Dict parts are kept packed (with the controller's packer) and unpacked only
/// when a query or reply needs them.
#[derive(Debug, Clone, Default)]
pub struct TaskRecord {
    pub msg_id: String,
    pub header: Option<Vec<u8>>,
    pub metadata: Option<Vec<u8>>,
    pub content: Option<Vec<u8>>,
    pub buffers: Vec<Blob>,
    pub submitted: Option<Micros>,
    pub client_uuid: Option<String>,
    pub engine_uuid: Option<String>,
    pub started: Option<Micros>,
    pub completed: Option<Micros>,
    pub resubmitted: Option<String>,
    pub received: Option<Micros>,
    pub result_header: Option<Vec<u8>>,
    pub result_metadata: Option<Vec<u8>>,
    pub result_content: Option<Vec<u8>>,
    pub result_buffers: Vec<Blob>,
    pub queue: Option<String>,
    pub execute_input: Option<String>,
    pub execute_result: Option<Vec<u8>>,
    pub error: Option<Vec<u8>>,
    pub stdout: String,
    pub stderr: String,
    /// `metadata.label`; `None` until known (filled lazily from `metadata`).
    pub label: Option<String>,
}

fn opt_str(s: &Option<String>) -> Value {
    s.as_ref()
        .map(|s| Value::Str(s.clone()))
        .unwrap_or(Value::Nil)
}

fn opt_date(t: Option<Micros>) -> Value {
    t.map(|t| Value::Str(date::format(t))).unwrap_or(Value::Nil)
}

/// Approximate stored size of a record (for the memory backend's size limit).
pub fn size_of(r: &TaskRecord) -> usize {
    let p = |x: &Option<Vec<u8>>| x.as_ref().map_or(0, Vec::len);
    let b = |x: &Vec<Blob>| x.iter().map(Blob::len).sum::<usize>();
    256 + r.msg_id.len()
        + p(&r.header)
        + p(&r.metadata)
        + p(&r.content)
        + p(&r.result_header)
        + p(&r.result_metadata)
        + p(&r.result_content)
        + p(&r.execute_result)
        + p(&r.error)
        + b(&r.buffers)
        + b(&r.result_buffers)
        + r.stdout.len()
        + r.stderr.len()
        + r.execute_input.as_ref().map_or(0, String::len)
}

impl TaskRecord {
    pub fn new(msg_id: String) -> TaskRecord {
        TaskRecord {
            msg_id,
            ..Default::default()
        }
    }

    pub fn pending(&self) -> bool {
        self.completed.is_none()
    }

    fn unpack(packer: Packer, data: &Option<Vec<u8>>, part: &'static str) -> Value {
        match data {
            None => Value::Nil,
            Some(bytes) => packer.unpack(bytes, part).unwrap_or(Value::Nil),
        }
    }

    /// The label: the stored one, else `metadata.label`.
    pub fn label(&self, packer: Packer) -> Value {
        if let Some(l) = &self.label {
            return Value::Str(l.clone());
        }
        match Self::unpack(packer, &self.metadata, "metadata").get("label") {
            Some(Value::Str(s)) => Value::Str(s.clone()),
            _ => Value::Nil,
        }
    }

    /// One field as a `Value` (dates as ISO strings; buffers as a list of their lengths — the
    /// bytes travel as frames). Unknown names give `None`.
    pub fn field(&self, name: &str, packer: Packer) -> Option<Value> {
        let lens =
            |b: &Vec<Blob>| Value::Array(b.iter().map(|x| Value::Int(x.len() as i64)).collect());
        Some(match name {
            "msg_id" => Value::Str(self.msg_id.clone()),
            "header" => Self::unpack(packer, &self.header, "header"),
            "metadata" => Self::unpack(packer, &self.metadata, "metadata"),
            "content" => Self::unpack(packer, &self.content, "content"),
            "buffers" => lens(&self.buffers),
            "submitted" => opt_date(self.submitted),
            "client_uuid" => opt_str(&self.client_uuid),
            "engine_uuid" => opt_str(&self.engine_uuid),
            "started" => opt_date(self.started),
            "completed" => opt_date(self.completed),
            "resubmitted" => opt_str(&self.resubmitted),
            "received" => opt_date(self.received),
            "result_header" => Self::unpack(packer, &self.result_header, "header"),
            "result_metadata" => Self::unpack(packer, &self.result_metadata, "metadata"),
            "result_content" => Self::unpack(packer, &self.result_content, "content"),
            "result_buffers" => lens(&self.result_buffers),
            "queue" => opt_str(&self.queue),
            "execute_input" => opt_str(&self.execute_input),
            "execute_result" => Self::unpack(packer, &self.execute_result, "content"),
            "error" => Self::unpack(packer, &self.error, "content"),
            "stdout" => Value::Str(self.stdout.clone()),
            "stderr" => Value::Str(self.stderr.clone()),
            "label" => self.label(packer),
            _ => return None,
        })
    }

    /// A string field, borrowed (for fast comparisons); `None` for other fields and for a
    /// label that must be read from the metadata.
    pub fn str_field(&self, name: &str) -> Option<Option<&str>> {
        Some(match name {
            "msg_id" => Some(self.msg_id.as_str()),
            "client_uuid" => self.client_uuid.as_deref(),
            "engine_uuid" => self.engine_uuid.as_deref(),
            "resubmitted" => self.resubmitted.as_deref(),
            "queue" => self.queue.as_deref(),
            "execute_input" => self.execute_input.as_deref(),
            "stdout" => Some(self.stdout.as_str()),
            "stderr" => Some(self.stderr.as_str()),
            "label" if self.label.is_some() => self.label.as_deref(),
            _ => return None,
        })
    }

    /// A date field as microseconds (for fast comparisons).
    pub fn date_field(&self, name: &str) -> Option<Option<Micros>> {
        Some(match name {
            "submitted" => self.submitted,
            "started" => self.started,
            "completed" => self.completed,
            "received" => self.received,
            _ => return None,
        })
    }

    /// Fill empty fields of `self` from `other` (a request copy arriving after iopub, or the
    /// other way round); non-empty fields of `self` win.
    pub fn merge_from(&mut self, other: TaskRecord) {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = other.$f; } )* };
        }
        fill!(
            header,
            metadata,
            content,
            submitted,
            client_uuid,
            engine_uuid,
            started,
            completed,
            resubmitted,
            received,
            result_header,
            result_metadata,
            result_content,
            queue,
            execute_input,
            execute_result,
            error,
            label
        );
        if self.buffers.is_empty() {
            self.buffers = other.buffers;
        }
        if self.result_buffers.is_empty() {
            self.result_buffers = other.result_buffers;
        }
        if self.stdout.is_empty() {
            self.stdout = other.stdout;
        }
        if self.stderr.is_empty() {
            self.stderr = other.stderr;
        }
    }
}

/// A change to an existing record, as produced by the relays.
#[derive(Debug, Clone)]
pub enum Update {
    /// A task was handed to an engine.
    Engine(String),
    /// The reply came back (or the controller answered in the engine's place).
    Reply {
        engine_uuid: Option<String>,
        started: Option<Micros>,
        completed: Micros,
        received: Micros,
        header: Vec<u8>,
        metadata: Vec<u8>,
        content: Vec<u8>,
        buffers: Vec<Blob>,
    },
    Stdout(String),
    Stderr(String),
    ExecuteInput(String),
    ExecuteResult(Vec<u8>),
    Error(Vec<u8>),
    Resubmitted(String),
}

impl Update {
    pub fn apply(self, r: &mut TaskRecord) {
        match self {
            Update::Engine(e) => r.engine_uuid = Some(e),
            Update::Reply {
                engine_uuid,
                started,
                completed,
                received,
                header,
                metadata,
                content,
                buffers,
            } => {
                if engine_uuid.is_some() {
                    r.engine_uuid = engine_uuid;
                }
                r.started = started.or(r.started);
                r.completed = Some(completed);
                r.received = Some(received);
                r.result_header = Some(header);
                r.result_metadata = Some(metadata);
                r.result_content = Some(content);
                r.result_buffers = buffers;
            }
            Update::Stdout(t) => r.stdout.push_str(&t),
            Update::Stderr(t) => r.stderr.push_str(&t),
            Update::ExecuteInput(c) => r.execute_input = Some(c),
            Update::ExecuteResult(c) => r.execute_result = Some(c),
            Update::Error(c) => r.error = Some(c),
            Update::Resubmitted(id) => r.resubmitted = Some(id),
        }
    }
}
