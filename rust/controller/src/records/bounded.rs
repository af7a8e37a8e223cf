//! A set of msg_ids that forgets its oldest entries beyond a capacity.

use std::collections::VecDeque;

use foldhash::{HashSet, HashSetExt};

/// The msg_ids most recently inserted (at most `capacity`; the oldest go first).
pub struct BoundedSet {
    ids: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl BoundedSet {
    pub fn new(capacity: usize) -> BoundedSet {
        BoundedSet {
            ids: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    pub fn remove(&mut self, id: &str) {
        self.ids.remove(id);
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_beyond_its_capacity() {
        let mut s = BoundedSet::new(2);
        s.insert("a");
        s.insert("b");
        s.insert("a"); // (already in: not moved)
        s.insert("c");
        assert!(!s.contains("a") && s.contains("b") && s.contains("c"));
        s.remove("b");
        assert!(!s.contains("b"));
    }
}
