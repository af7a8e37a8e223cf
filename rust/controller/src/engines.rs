//! The engine table: registration state, in-flight work, and the persisted engine state file.

use std::collections::BTreeMap;

// (foldhash: keys are msg_ids and uuids of signed messages; see "fast_maps" in lib.rs)
use foldhash::{HashMap, HashSet};
use std::time::Instant;

use fp_wire::Value;

/// A request forwarded to an engine and not yet answered.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub client: Vec<u8>,
    pub header: Value,
    pub msg_type: String,
}

#[derive(Debug)]
pub struct Engine {
    pub id: i64,
    pub uuid: Vec<u8>,
    pub registered: bool,
    /// Last heartbeat (beat number) this engine answered.
    pub last_beat: u64,
    /// Pending registrations are dropped after this instant.
    pub stall_deadline: Instant,
    /// Direct (MUX) requests in flight, by msg_id.
    pub mux: HashMap<String, InFlight>,
    /// Broadcast requests in flight, by the msg_id the engine got.
    pub bcast: HashMap<String, crate::broadcast::BcastInFlight>,
    /// msg_ids of the load-balanced tasks in flight (the scheduler holds the tasks).
    pub tasks: HashSet<String>,
    /// msg_ids of the requests this engine finished, direct and load-balanced, in order (what
    /// a verbose `queue_request` lists, as ipyparallel's hub keeps them).
    pub completed: Vec<String>,
}

impl Engine {
    pub fn uuid_str(&self) -> String {
        String::from_utf8_lossy(&self.uuid).into_owned()
    }
}

#[derive(Debug, Default)]
pub struct EngineTable {
    pub by_uuid: HashMap<Vec<u8>, Engine>,
    pub ids: BTreeMap<i64, Vec<u8>>,
    /// Ids ever handed out (never reused automatically).
    used_ids: HashSet<i64>,
    pub next_id: i64,
}

impl EngineTable {
    /// Choose an id: the requested one if it is free, else the next never-used one.
    pub fn assign_id(&mut self, requested: Option<i64>) -> i64 {
        if let Some(r) = requested {
            if r >= 0 && !self.ids.contains_key(&r) {
                self.used_ids.insert(r);
                self.next_id = self.next_id.max(r + 1);
                return r;
            }
        }
        while self.used_ids.contains(&self.next_id) {
            self.next_id += 1;
        }
        let id = self.next_id;
        self.used_ids.insert(id);
        self.next_id += 1;
        id
    }

    pub fn insert(&mut self, engine: Engine) {
        self.ids.insert(engine.id, engine.uuid.clone());
        self.by_uuid.insert(engine.uuid.clone(), engine);
    }

    pub fn remove(&mut self, uuid: &[u8]) -> Option<Engine> {
        let engine = self.by_uuid.remove(uuid)?;
        self.ids.remove(&engine.id);
        Some(engine)
    }

    pub fn uuid_of(&self, id: i64) -> Option<&Vec<u8>> {
        self.ids.get(&id)
    }

    /// Registered engines as `{"<id>": "<uuid>"}`.
    pub fn registered_map(&self) -> Value {
        Value::Map(
            self.ids
                .iter()
                .filter_map(|(id, uuid)| {
                    let e = self.by_uuid.get(uuid)?;
                    e.registered
                        .then(|| (Value::Str(id.to_string()), Value::Str(e.uuid_str())))
                })
                .collect(),
        )
    }

    pub fn registered_count(&self) -> usize {
        self.by_uuid.values().filter(|e| e.registered).count()
    }

    /// Persist `{"engines": {id: uuid}, "next_id": n}` (best effort; errors are returned).
    pub fn save_state(&self, path: &str) -> Result<(), String> {
        let engines: serde_json::Map<String, serde_json::Value> = self
            .by_uuid
            .values()
            .filter(|e| e.registered)
            .map(|e| (e.id.to_string(), serde_json::Value::String(e.uuid_str())))
            .collect();
        let doc = serde_json::json!({ "engines": engines, "next_id": self.next_id });
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, doc.to_string()).map_err(|e| format!("{tmp}: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))
    }

    /// Load the next id from a state file written earlier (for `--restore`).
    pub fn restore_state(&mut self, path: &str) -> Result<usize, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        if let Some(n) = doc.get("next_id").and_then(|v| v.as_i64()) {
            self.next_id = self.next_id.max(n);
        }
        let mut count = 0;
        if let Some(map) = doc.get("engines").and_then(|v| v.as_object()) {
            for id in map.keys().filter_map(|k| k.parse::<i64>().ok()) {
                self.used_ids.insert(id);
                self.next_id = self.next_id.max(id + 1);
                count += 1;
            }
        }
        Ok(count)
    }
}
