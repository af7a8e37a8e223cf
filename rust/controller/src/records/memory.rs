//! The in-memory backend (default): bounded by a record count and a byte size, culling the
//! oldest records first. Reading a culled record is a clear KeyError.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use super::bounded::BoundedSet;
use super::query::{Query, QueryError};
use super::record::{size_of, TaskRecord, Update};
use super::Backend;
use fp_wire::Packer;

/// How many culled msg_ids are remembered for the "culled" error.
const CULLED_MEMORY: usize = 1 << 20;

pub struct Memory {
    records: HashMap<String, (Box<TaskRecord>, usize)>,
    /// Arrival order (may hold ids already removed; skipped and compacted).
    order: VecDeque<String>,
    bytes: usize,
    record_limit: usize,
    size_limit: usize,
    culled: BoundedSet,
    packer: Packer,
}

impl Memory {
    pub fn new(record_limit: usize, size_limit: usize, packer: Packer) -> Memory {
        Memory {
            records: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            record_limit: record_limit.max(1),
            size_limit: size_limit.max(1),
            culled: BoundedSet::new(CULLED_MEMORY),
            packer,
        }
    }

    fn insert(&mut self, rec: TaskRecord) {
        let size = size_of(&rec);
        self.bytes += size;
        self.order.push_back(rec.msg_id.clone());
        self.records
            .insert(rec.msg_id.clone(), (Box::new(rec), size));
        self.cull();
    }

    fn remember_culled(&mut self, id: String) {
        self.culled.insert(&id);
    }

    /// Over the record limit: drop the oldest tenth of the limit. Over the size limit: drop
    /// the oldest until under 90% of it.
    fn cull(&mut self) {
        if self.records.len() > self.record_limit {
            let target = self.record_limit - (self.record_limit / 10).max(1).min(self.record_limit);
            self.drop_oldest(|m| m.records.len() > target);
        }
        if self.bytes > self.size_limit {
            let target = self.size_limit / 10 * 9;
            self.drop_oldest(|m| m.bytes > target);
        }
    }

    fn drop_oldest(&mut self, mut more: impl FnMut(&Memory) -> bool) {
        while more(self) {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if let Some((_, size)) = self.records.remove(&id) {
                self.bytes -= size;
                self.remember_culled(id);
            }
        }
    }

    fn missing(&self, msg_id: &str) -> QueryError {
        if self.culled.contains(msg_id) {
            QueryError::key(format!(
                "task record {msg_id:?} was culled to keep the in-memory records within their \
                 limits (raise --db-record-limit / --db-size-limit, or use --db sqlite)"
            ))
        } else {
            QueryError::key(format!("no task record {msg_id:?}"))
        }
    }

    fn compact(&mut self) {
        if self.order.len() > 2 * self.records.len() + 1024 {
            let records = &self.records;
            self.order.retain(|id| records.contains_key(id));
        }
    }
}

impl Backend for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn add(&mut self, rec: TaskRecord) {
        if let Some((old, size)) = self.records.get_mut(&rec.msg_id) {
            old.merge_from(rec);
            let new = size_of(old);
            self.bytes = self.bytes + new - *size;
            *size = new;
            self.cull();
            return;
        }
        self.culled.remove(&rec.msg_id);
        self.insert(rec);
    }

    fn update(&mut self, msg_id: &str, u: Update) {
        if let Some((rec, size)) = self.records.get_mut(msg_id) {
            // (one lookup: the size is brought up to date under the same borrow)
            u.apply(rec);
            let new = size_of(rec);
            self.bytes = self.bytes + new - *size;
            *size = new;
            if self.bytes > self.size_limit {
                self.cull();
            }
        } else if !self.culled.contains(msg_id) {
            let mut rec = TaskRecord::new(msg_id.to_owned());
            u.apply(&mut rec);
            self.insert(rec);
        }
    }

    fn get(&mut self, msg_id: &str) -> Result<TaskRecord, QueryError> {
        match self.records.get(msg_id) {
            Some((r, _)) => Ok((**r).clone()),
            None => Err(self.missing(msg_id)),
        }
    }

    fn find(&mut self, q: &Query, f: &mut dyn FnMut(&TaskRecord)) -> Result<(), QueryError> {
        if let Some(ids) = q.msg_ids() {
            for id in ids {
                if let Some((r, _)) = self.records.get(&id) {
                    if q.matches(r, self.packer) {
                        f(r);
                    }
                }
            }
            return Ok(());
        }
        self.compact();
        for id in &self.order {
            if let Some((r, _)) = self.records.get(id) {
                if q.matches(r, self.packer) {
                    f(r);
                }
            }
        }
        Ok(())
    }

    fn remove(&mut self, ids: &[String]) {
        for id in ids {
            if let Some((_, size)) = self.records.remove(id) {
                self.bytes -= size;
            }
        }
        self.compact();
    }

    fn history(&mut self) -> Result<Vec<(String, Option<i64>)>, QueryError> {
        self.compact();
        Ok(self
            .order
            .iter()
            .filter_map(|id| self.records.get(id).map(|(r, _)| (id.clone(), r.submitted)))
            .collect())
    }
}
